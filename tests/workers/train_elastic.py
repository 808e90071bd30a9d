"""Worker: `hvd_easgd.train.run` as an elastic job, one worker SIGKILLed or poisoned mid-run.

`--config RECIPE --run-dir DIR [--set KEY=VALUE ...]` as hvd-easgd-train; `--kill-step N`: the
worker on host 127.0.0.1 kills itself (SIGKILL) after step N, once per job (a marker file in the
run directory). Each process that finishes writes RUN_DIR/result-<host>-<local rank>.json with
its summary.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hvd_easgd.train.config import load_config  # noqa: E402
from hvd_easgd.train.cli import run  # noqa: E402
from tests.hvdrun import write_json_atomic  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--kill-step", type=int, default=0)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    host = os.environ.get("HOROVOD_HOSTNAME", "unknown")
    slot = f"{host}-{os.environ.get('HOROVOD_LOCAL_RANK', '0')}"

    def on_step(step):
        marker = run_dir / "killed"
        if host == "127.0.0.1" and step == args.kill_step and not marker.exists():
            marker.write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)

    summary = run(load_config(args.config, args.overrides), run_dir=run_dir, on_step=on_step)
    import horovod.torch as hvd

    plain = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
    write_json_atomic(run_dir / f"result-{slot}.json", {**plain, "rank": hvd.rank(), "size": hvd.size()})


if __name__ == "__main__":
    main()
