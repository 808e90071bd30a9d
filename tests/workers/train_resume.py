"""Worker script for tests/train/test_cli.py: interrupted and resumed training runs on digits.

Phases (each a separate horovodrun job, so a resume really starts from the files):
  first   for every case: an uninterrupted run (RUN/<case>/full) and a run that is stopped after
          step STOP, as if preempted (RUN/<case>/stopped)
  resume  for every case: `run(..., resume=True)` in RUN/<case>/stopped
  regrow  resume RUN/<case>/regrow (a copy of a stopped run) with another number of workers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402

from hvd_easgd.train.config import load_config  # noqa: E402
from hvd_easgd.train.cli import TrainingStopped, run  # noqa: E402
from hvd_easgd.train.resume import RESUME_BROADCAST_ENV  # noqa: E402
from tests.hvdrun import write_rank_result  # noqa: E402

RECIPE = REPO / "recipes" / "demo" / "digits.yaml"
COMMON = [
    "train.max_steps=30", "checkpoint.every=9", "checkpoint.keep=3", "train.eval_every=10",
    "log.every=5", "log.progress=false", "launch.np=null",
]
STOP = 22  # the newest checkpoint before it is step 18: steps 19..22 are lost and redone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", required=True, choices=("first", "resume", "regrow"))
    ap.add_argument("--cases", required=True, help="JSON {case name: [overrides]}")
    ap.add_argument("--extra", default="[]", help="JSON list of overrides for this phase")
    ap.add_argument("--broadcast", default="[]", help="JSON list of cases resumed via rank 0's copy")
    args = ap.parse_args()
    hvd.init()
    root = Path(args.out)
    cases = json.loads(args.cases)
    extra = json.loads(args.extra)
    broadcast = json.loads(args.broadcast)
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, overrides in cases.items():
            cfg = load_config(RECIPE, COMMON + overrides + extra)
            if args.phase == "first":
                full = run(cfg, run_dir=root / name / "full")
                try:
                    run(cfg, run_dir=root / name / "stopped", stop_at_step=STOP)
                    stopped = False
                except TrainingStopped:
                    stopped = True
                result[name] = {"full": _plain(full), "stopped": stopped}
            elif args.phase == "resume":
                # one case reads the checkpoint on every worker, the other has rank 0 send it
                os.environ[RESUME_BROADCAST_ENV] = "1" if name in broadcast else "0"
                result[name] = {"resumed": _plain(run(cfg, run_dir=root / name / "stopped", resume=True))}
                os.environ.pop(RESUME_BROADCAST_ENV)
            else:
                result[name] = {"regrow": _plain(run(cfg, run_dir=root / name / "regrow", resume=True))}
    result["warnings"] = [str(w.message) for w in caught]
    write_rank_result(args.out, hvd.rank(), result)


def _plain(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}


if __name__ == "__main__":
    main()
