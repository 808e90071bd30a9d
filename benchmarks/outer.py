"""Center test error at large tau: EASGD, model averaging and DiLoCo (outer Nesterov) on digits.

Run under Horovod; every configuration trains inside this ONE job, one after the other::

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/outer.py \
        --json runs/bench/outer.json

Data: scikit-learn's bundled digits, each worker its own shard; model ``digits_net``; batch
``--batch`` per worker, the same budget of samples per worker, initialisation and data order
for every configuration (as in benchmarks/accuracy.py, which this does not import: it is owned
separately). Methods, all sync mode, L2 weight decay 1e-4:

- ``easgd``: local SGD, ``ElasticOptimizer(method="easgd", beta=0.9)``;
- ``average``: local SGD, ``method="average"`` (periodic model averaging / local SGD);
- ``diloco-sgd``: local SGD, ``method="diloco"`` (outer Nesterov SGD, lr 0.7, momentum 0.9):
  the same exchange as ``average`` with DiLoCo's outer optimizer, so the difference between the
  two rows is the outer optimizer alone;
- ``diloco``: DiLoCo as published: local AdamW, ``method="diloco"``.

Learning rates: ``LR`` below (SGD 0.2, the grid-searched value of benchmarks/accuracy.py for
easgd/average; AdamW's from a small grid at tau 64: 0.001, 0.003, 0.01), override with
``--lr METHOD=VALUE``. Reported per configuration: final and best center test error (mean over
``--seeds``) and the parameter bytes each worker sends per step (``ExchangeStats``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from benchmarks.accuracy import center_error
from benchmarks.common import environment, format_table, setup_worker, write_json

METHODS = ("easgd", "average", "diloco-sgd", "diloco")
LR = {"easgd": 0.2, "average": 0.2, "diloco-sgd": 0.2, "diloco": 0.003}
WEIGHT_DECAY = 1e-4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--taus", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.lrs = dict(LR)
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in METHODS:
            p.error(f"--lr expects METHOD=VALUE with METHOD in {METHODS}")
        args.lrs[method] = float(value)
    return args


def make_optimizer(method: str, tau: int, model: torch.nn.Module, lr: float):
    import hvd_easgd

    if method == "diloco":
        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    else:
        base = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    kw: Dict[str, Any] = {"beta": 0.9} if method == "easgd" else {}
    wrapper = {"easgd": "easgd", "average": "average"}.get(method, "diloco")
    return hvd_easgd.ElasticOptimizer(base, model.named_parameters(), tau=tau, method=wrapper,
                                      mode="sync", **kw)


def run_one(method: str, tau: int, seed: int, args, bundle, total_steps: int,
            eval_every: int) -> Dict[str, Any]:
    from hvd_easgd.train.data import eval_loader, train_loader
    from hvd_easgd.train.models import build_model

    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(seed)
    model = build_model("digits_net", bundle.num_classes, in_channels=1)
    center = build_model("digits_net", bundle.num_classes, in_channels=1)
    opt = make_optimizer(method, tau, model, args.lrs[method])
    train = train_loader(bundle.train, args.batch, rank=rank, world_size=size, seed=seed)
    test = eval_loader(bundle.test, 256, rank=rank, world_size=size)
    torch.manual_seed(seed + 1 + rank)
    errors: List[float] = []
    step, epoch, started = 0, 0, time.perf_counter()
    while step < total_steps:
        train.sampler.set_epoch(epoch)
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step % eval_every == 0 or step == total_steps:
                center.load_state_dict(opt.center_state_dict(), strict=False)
                errors.append(center_error(center, test))
            if step == total_steps:
                break
        epoch += 1
    stats = opt.stats
    opt.close()
    return {"final": errors[-1], "best": min(errors), "seconds": time.perf_counter() - started,
            "bytes_per_step": stats.bytes_communicated / max(1, stats.steps)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    hvd.init()
    setup_worker(args.threads)
    from hvd_easgd.train.data import build_datasets

    rank, size = hvd.rank(), hvd.size()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    bundle = build_datasets("digits")
    steps_per_epoch = (len(bundle.train) // size) // args.batch
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    eval_every = steps_per_epoch
    rows, results = [], []
    for tau in args.taus:
        for method in args.methods:
            runs = [run_one(method, tau, s, args, bundle, total_steps, eval_every)
                    for s in args.seeds]
            result = {
                "method": method, "tau": tau, "lr": args.lrs[method],
                "final_error": statistics.mean(r["final"] for r in runs),
                "best_error": statistics.mean(r["best"] for r in runs),
                "final_errors": [r["final"] for r in runs],
                "bytes_per_step": runs[0]["bytes_per_step"],
                "seconds": statistics.mean(r["seconds"] for r in runs),
            }
            results.append(result)
            rows.append([method, tau, result["lr"], f"{result['final_error']:.1%}",
                         f"{result['best_error']:.1%}",
                         " ".join(f"{e:.1%}" for e in result["final_errors"]),
                         f"{result['bytes_per_step']:.0f}", f"{result['seconds']:.1f}"])
            log(f"{method:>10} tau={tau:<4} final {result['final_error']:.1%} "
                f"best {result['best_error']:.1%} ({result['seconds']:.1f} s/run)")
    table = format_table(["method", "tau", "lr", "final error", "best error", "per seed",
                          "bytes sent/step/worker", "s/run"], rows)
    payload = {"benchmark": "outer", "config": {
        "world_size": size, "batch": args.batch, "total_steps": total_steps,
        "epochs": args.epochs, "seeds": args.seeds, "lrs": args.lrs},
        "environment": environment(), "results": results}
    if rank == 0:
        print(f"## outer optimizers at large tau: digits, {size} workers, batch {args.batch}/"
              f"worker, {total_steps} steps/worker, mean over seeds {args.seeds}\n\n{table}")
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
