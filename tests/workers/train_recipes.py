"""Worker script for tests/train/test_recipes.py: every recipe, a few steps on tiny fake data, in ONE job.

A recipe with communication rounds runs tau + 1 steps, so at least one round happens.

Each recipe keeps its method, mode, tau, schedule, model and optimizer settings; only the data
(torchvision FakeData at the smallest image size the recipe's model accepts), the batch size, the
number of steps and the outputs are overridden. Runs follow each other in this process, so a run
that leaves Horovod or a background thread in a bad state breaks the next one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402

from hvd_easgd.train.config import ELASTIC_METHODS, load_config  # noqa: E402
from hvd_easgd.train.cli import run  # noqa: E402
from tests.hvdrun import write_rank_result  # noqa: E402

#: model -> (channels, side) of the smallest input it takes (the paper's nets: no layer vanishes)
TINY_SHAPE = {"cifar_paper": (3, 24), "imagenet_paper": (3, 101), "digits_net": (1, 8),
              "resnet18": (3, 32), "resnet34": (3, 32), "resnet50": (3, 32)}
BIG_MODELS = ("imagenet_paper",)  # ~20M parameters even at 101 px: skip its checkpoints


#: the config methods trained by hvd_easgd.ElasticOptimizer (they have communication rounds)
ROUND_METHODS = tuple(ELASTIC_METHODS)


def smoke_steps(cfg) -> int:
    """Steps of a smoke run: past the first round (step tau) for the methods with rounds."""
    return max(3, int(cfg.optimizer.tau) + 1) if cfg.optimizer.method in ROUND_METHODS else 3


def smoke_overrides(cfg) -> list:
    c, side = TINY_SHAPE[cfg.model.name]
    big = cfg.model.name in BIG_MODELS
    steps = smoke_steps(cfg)
    mid = max(2, steps // 2)
    out = [
        "data.name=fake", "data.root=null", "data.download=false", "data.image_size=null",
        "data.augment=null",  # an ImageNet choice; the fake data has none
        "data.num_workers=0", f"data.fake_image_shape=[{c},{side},{side}]", "data.fake_train_size=16",
        "data.fake_test_size=8", "data.fake_num_classes=10",
        "train.batch_size=2", f"train.max_steps={steps}", "train.eval_batch_size=4", "train.max_eval_batches=1",
        "train.device=cpu", "train.threads=1", "log.every=2", "log.progress=false", "log.tensorboard=true",
        "launch.np=null", "elastic.enabled=false",  # elastic runs: tests/optim/test_horovod_elastic.py
    ]
    if big:  # the whole path once, at the end; no checkpoint of 2 x ~20M parameters
        out += ["train.eval_every=0", "train.eval_local=false", "checkpoint.every=0", "checkpoint.at_end=false"]
    else:  # evaluation and a checkpoint mid-run (training goes on after them), and at the end
        out += [f"train.eval_every={mid}", f"checkpoint.every={mid}", "checkpoint.at_end=true"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", required=True, help="JSON list of recipe paths")
    args = ap.parse_args()
    hvd.init()
    out = Path(args.out)
    results = {}
    for recipe in json.loads(args.recipes):
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = load_config(recipe)
                cfg = load_config(recipe, smoke_overrides(base))
                summary = run(cfg, run_dir=out / "runs" / Path(recipe).relative_to(REPO / "recipes").with_suffix(""))
            results[recipe] = {
                "ok": True, "seconds": time.perf_counter() - started, "step": summary["step"],
                "method": summary["method"], "center/test_error": summary.get("center/test_error"),
                "train/loss": summary.get("train/loss"), "center_path": summary.get("center_path"),
                "rounds": summary.get("rounds"), "tau": int(cfg.optimizer.tau),
            }
        except Exception as e:  # noqa: BLE001 - report every recipe, not just the first failure
            results[recipe] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()}
            # a failure on one rank only would hang the next collective: stop here
            if hvd.size() > 1:
                break
    write_rank_result(args.out, hvd.rank(), results)


if __name__ == "__main__":
    main()
