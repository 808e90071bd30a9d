"""``python -m hvd_easgd.train``: the same as ``hvd-easgd-train``."""

import sys

from hvd_easgd.train.cli import main

sys.exit(main())
