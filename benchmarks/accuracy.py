"""Center test error against wall-clock on digits: every method at every tau, in ONE job.

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/accuracy.py \
        --json runs/bench/accuracy.json --png runs/bench/accuracy.png
    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/accuracy.py \
        --methods easgd average diloco-sgd diloco --taus 16 64 128 256 --seeds 0 1 2

Data: scikit-learn's bundled digits (no download), each worker its own shard; model
``digits_net``; the methods of :mod:`benchmarks.digits` (all elastic ones in sync mode, so the
comparison is about the algorithms). Every configuration gets the same budget of samples per
worker, the same initialisation and the same data order (``--seeds``: one run per seed, the
table shows the mean). The center (for ``sgd``: the replicated model) is evaluated every
``--eval-every`` steps on the whole test set; evaluation is not counted in the wall-clock.
Reported per configuration: final and best center test error, time and steps to ``--target``,
divergence, bytes each worker hands Horovod per step; then whether the paper's qualitative
findings hold in these numbers.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd

from benchmarks.common import environment, format_table, setup_worker, write_json
from benchmarks.digits import METHODS, Config, RunPlan, build_configs, parse_lr, train_run

DEFAULT_METHODS = ("easgd", "eamsgd", "downpour", "average", "sgd")
#: "Stable as tau grows": final error at the largest tau within this of the smallest tau's.
STABILITY_MARGIN = 0.02
#: A final center error at least this high, after having been below 50 %, counts as diverged.
COLLAPSED = 0.8


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=DEFAULT_METHODS)
    p.add_argument("--taus", type=int, nargs="+", default=None, help="default 1 4 16 64 "
                   "(--quick: 1 16)")
    p.add_argument("--batch", type=int, default=16, help="per-worker batch size")
    p.add_argument("--epochs", type=float, default=None,
                   help="budget: passes over each worker's shard (default 20; --quick: 4)")
    p.add_argument("--steps", type=int, default=None, help="budget in steps instead of epochs")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations of the center (default: one epoch)")
    p.add_argument("--target", type=float, default=0.10, help="test error to reach")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR",
                   help="learning-rate overrides of benchmarks/digits.py's DEFAULT_LR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (initialisation, data order, dropout)")
    p.add_argument("--quick", action="store_true", help="taus 1 16 and 4 epochs unless given")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="figure: center test error vs wall-clock, a panel per tau")
    args = p.parse_args(argv)
    taus = args.taus or ([1, 16] if args.quick else [1, 4, 16, 64])
    epochs = args.epochs or (4 if args.quick else 20)
    if min(taus) < 1 or args.batch < 1 or (args.steps or 1) < 1 or epochs <= 0:
        p.error("every tau, --batch, --steps and --epochs must be positive")
    parse_lr(args.lr)  # a bad --lr fails here, before Horovod starts
    return argparse.Namespace(**{**vars(args), "taus": taus, "epochs": epochs})


def run_config(config: Config, args: argparse.Namespace, bundle, steps: int,
               eval_every: int) -> Dict[str, Any]:
    """Every seed of one configuration; errors are the mean over seeds."""
    from hvd_easgd.train.data import eval_loader

    lr = parse_lr(args.lr)[config.method]
    test = eval_loader(bundle.test, 256, rank=hvd.rank(), world_size=hvd.size())
    runs = [train_run(RunPlan(config.method, config.tau, lr, init_seed=seed, data_seed=seed,
                              dropout_seed=seed + 1, steps=steps, eval_every=eval_every,
                              batch=args.batch), bundle.train, [test], bundle.num_classes)
            for seed in args.seeds]
    finals = [r["history"][-1]["errors"][0] for r in runs]
    bests = [min(h["errors"][0] for h in r["history"]) for r in runs]
    # also a collapse without NaNs: it had learned (< 50 % error), then fell back to chance
    diverged = [r["diverged"] or (b < 0.5 and f >= COLLAPSED)
                for r, f, b in zip(runs, finals, bests)]
    reached = [next(((h["seconds"], h["steps"]) for h in r["history"]
                     if h["errors"][0] <= args.target), (None, None)) for r in runs]
    first = runs[0]["history"]
    return {
        "config": config.name, "method": config.method, "tau": config.tau, "lr": lr,
        "final_error": statistics.mean(finals), "best_error": statistics.mean(bests),
        "final_errors": finals, "diverged": any(diverged), "seconds": first[-1]["seconds"],
        "time_to_target": _mean_if_all([t for t, _ in reached]),
        "steps_to_target": _mean_if_all([s for _, s in reached]),
        "bytes_sent": runs[0]["bytes_sent"],
        "history": [{"seconds": h["seconds"], "steps": h["steps"], "error": h["errors"][0]}
                    for h in first],
    }


def _mean_if_all(values: Sequence[Optional[float]]) -> Optional[float]:
    return None if None in values else statistics.mean(values)


def findings(results: Dict[str, Dict[str, Any]], taus: Sequence[int]) -> List[str]:
    """The paper's qualitative claims, checked against this run's numbers, either way."""
    if len(taus) < 2:
        return ["(one tau only: nothing to say about behaviour as tau grows)"]
    lo, hi = min(taus), max(taus)
    lines: List[str] = []
    for method, claim in (("easgd", "stays stable"), ("eamsgd", "stays stable"),
                          ("downpour", "degrades")):
        a, b = results.get(f"{method}-tau{lo}"), results.get(f"{method}-tau{hi}")
        if a is None or b is None:
            continue
        worse = b["diverged"] or b["final_error"] > a["final_error"] + STABILITY_MARGIN
        holds = worse if claim == "degrades" else not worse
        lines.append(f"{method.upper()} {claim} as tau grows (paper): "
                     f"{'HOLDS' if holds else 'DOES NOT HOLD'} here: final center error "
                     f"{a['final_error']:.1%} at tau={lo} -> {b['final_error']:.1%} at tau={hi}"
                     + (" (diverged)" if b["diverged"] else ""))
    for tau in taus:
        mine = results.get(f"eamsgd-tau{tau}")
        others = [r for r in results.values()
                  if r["method"] != "eamsgd" and r["tau"] in (tau, None)]
        if mine is None or not others:
            continue
        best = min(others, key=lambda r: r["final_error"])
        lines.append(f"EAMSGD beats every baseline at tau={tau} (paper): "
                     f"{'HOLDS' if mine['final_error'] < best['final_error'] else 'DOES NOT HOLD'}"
                     f" here: {mine['final_error']:.1%} vs best other {best['config']} "
                     f"{best['final_error']:.1%}")
    return lines


def plot(results: Dict[str, Dict[str, Any]], taus: Sequence[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(taus), 2)
    fig, axes = plt.subplots(math.ceil(len(taus) / cols), cols, squeeze=False, sharey=True,
                             figsize=(6 * cols, 4 * math.ceil(len(taus) / cols)))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for ax, tau in zip(axes.flat, taus):
        for r in (r for r in results.values() if r["tau"] in (tau, None)):
            sgd = r["method"] == "sgd"
            ax.plot([h["seconds"] for h in r["history"]],
                    [100 * h["error"] for h in r["history"]],
                    color="k" if sgd else colors[r["method"]], linestyle="--" if sgd else "-",
                    label="sync SGD (hvd.DistributedOptimizer)" if sgd else r["method"])
        ax.set(title=f"tau = {tau}", xlabel="training wall-clock (s)",
               ylabel="center test error (%)", ylim=(0, 30))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(taus):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    hvd.init()
    setup_worker(args.threads)
    from hvd_easgd.train.data import build_datasets

    rank, size = hvd.rank(), hvd.size()
    bundle = build_datasets("digits")
    steps_per_epoch = (len(bundle.train) // size) // args.batch
    steps = args.steps or max(1, round(args.epochs * steps_per_epoch))
    eval_every = args.eval_every or steps_per_epoch
    started = time.perf_counter()
    results: Dict[str, Dict[str, Any]] = {}
    for config in build_configs(args.methods, args.taus):
        results[config.name] = run_config(config, args, bundle, steps, eval_every)
        if rank == 0:
            print(f"{config.name:>16}: final error {results[config.name]['final_error']:6.1%}",
                  file=sys.stderr, flush=True)
    payload = {
        "benchmark": "accuracy",
        "config": {**vars(args), "world_size": size, "total_steps": steps,
                   "eval_every": eval_every, "steps_per_epoch": steps_per_epoch,
                   "job_seconds": time.perf_counter() - started},
        "environment": environment(),
        "results": list(results.values()),
        "findings": findings(results, args.taus),
    }
    if rank == 0:
        print(render(payload))
        write_json(args.json, payload)
        if args.png:
            plot(results, args.taus, args.png,
                 f"digits, {size} workers, batch {args.batch}/worker, {steps} steps/worker")
    return payload


def render(payload: Dict[str, Any]) -> str:
    cfg = payload["config"]
    target = f"{cfg['target']:.0%}"
    headers = ["method", "tau", "lr", "final error", "per seed", "best error",
               f"time to {target} (s)", f"steps to {target}", "train time (s)", "diverged",
               "bytes sent/worker"]
    rows = [[r["method"], r["tau"] or "-", r["lr"], f"{r['final_error']:.1%}",
             " ".join(f"{e:.1%}" for e in r["final_errors"]), f"{r['best_error']:.1%}",
             r["time_to_target"], r["steps_to_target"], r["seconds"],
             "yes" if r["diverged"] else "no",
             r["bytes_sent"]]
            for r in payload["results"]]
    return "\n".join([
        f"## accuracy: digits, {cfg['world_size']} workers, batch {cfg['batch']}/worker, "
        f"{cfg['total_steps']} steps/worker, seeds {cfg['seeds']}, center evaluated every "
        f"{cfg['eval_every']} steps", "", format_table(headers, rows), "",
        "paper's qualitative findings, here:", *(f"- {line}" for line in payload["findings"])])


if __name__ == "__main__":
    main()
