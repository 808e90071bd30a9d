"""The import paths of hvd-easgd 0.1 (one flat package), kept for one release.

``import hvd_easgd.optimizer`` (or ``hvd_easgd.comm``, ...) still works and gives the module at
its new place, with a :class:`DeprecationWarning` naming that place; objects pickled under the
old paths (for instance in a saved checkpoint) load the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module -> where it lives now
MOVED = {
    "hvd_easgd.optimizer": "hvd_easgd.optim.optimizer",
    "hvd_easgd.rounds": "hvd_easgd.optim.rounds",
    "hvd_easgd.elastic": "hvd_easgd.optim.rules",
    "hvd_easgd.center": "hvd_easgd.optim.center",
    "hvd_easgd.flat": "hvd_easgd.optim.flat",
    "hvd_easgd.comm": "hvd_easgd.optim.exchange",
    "hvd_easgd.recovery": "hvd_easgd.optim.horovod_elastic",
    "hvd_easgd.optim.recovery": "hvd_easgd.optim.horovod_elastic",
    "hvd_easgd.outer": "hvd_easgd.optim.outer",
    "hvd_easgd.hierarchy": "hvd_easgd.optim.hierarchy",
    "hvd_easgd.checks": "hvd_easgd.optim.checks",
    "hvd_easgd.tuning": "hvd_easgd.optim.tuning",
    "hvd_easgd.trainer": "hvd_easgd.train.trainer",
    "hvd_easgd.config": "hvd_easgd.train.config",
    "hvd_easgd.checkpoint": "hvd_easgd.train.checkpoint",
    "hvd_easgd.console": "hvd_easgd.train.console",
    "hvd_easgd.metrics": "hvd_easgd.train.metrics",
    "hvd_easgd.sweep": "hvd_easgd.train.sweep",
    "hvd_easgd.plot": "hvd_easgd.train.plot",
    "hvd_easgd.data": "hvd_easgd.train.data",
    "hvd_easgd.models": "hvd_easgd.train.models",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands back the module from its new one."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path goes "
                      "in the next release)", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module at its new place is already executed


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
