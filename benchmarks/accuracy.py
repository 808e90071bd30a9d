"""Center test error against wall-clock: EASGD, EAMSGD, DOWNPOUR, averaging and sync SGD.

Run under Horovod; every configuration trains inside this ONE job, one after the other::

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/accuracy.py \
        --json runs/bench/accuracy.json --png runs/bench/accuracy.png

Data: scikit-learn's bundled digits (real data, no download), each worker its own shard
(``hvd_easgd.train.data.train_loader``); model: ``digits_net``. Methods, all with L2 weight decay
1e-4 and batch ``--batch`` per worker, the same budget of samples per worker, the same
initialisation (``--seed``) and the same data order:

- ``easgd``: plain SGD locally, ``ElasticOptimizer(method="easgd", beta=0.9)``;
- ``eamsgd``: SGD with Nesterov momentum 0.99 (the paper's delta) locally, method ``easgd``;
- ``downpour``: plain SGD locally, ``method="downpour"``;
- ``average``: plain SGD locally, ``method="average"`` (periodic model averaging);
- ``sgd``: ``hvd.DistributedOptimizer`` (gradients averaged every step) around SGD with
  Nesterov momentum 0.9: synchronous data-parallel SGD as Horovod users run it today. It has no
  tau, so it runs once and appears in every panel.

Every elastic method runs for every tau in ``--taus``, in sync mode (each round applied at
once), so the comparison is about the algorithms, not about overlap on this machine. The center
(for ``sgd``: the replicated model) is evaluated every ``--eval-every`` steps on the whole test
set (split over the workers); evaluation is not counted in the wall-clock time. Learning rates
(``DEFAULT_LR``, override with ``--lr METHOD=VALUE``) were chosen by a small grid search on
this task at tau 1 and 16 (see benchmarks/README.md).

Reported per configuration: final and best center test error, the training time and steps to
first reach ``--target`` error, and whether training diverged. The script then says, from
these numbers, whether the paper's qualitative findings hold here.

``--protocol paper`` runs the paper's protocol instead (learning-rate grids chosen on a
validation split, seeds, two tasks, 2 and 4 workers): ``benchmarks/protocol.py``, which this
flag forwards to with the other arguments::

    python benchmarks/accuracy.py --protocol paper --quick --json q.json --png q.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from benchmarks.common import environment, format_table, setup_worker, write_json

METHODS = ("easgd", "eamsgd", "downpour", "average", "sgd")
#: Every method this script can run (benchmarks/protocol.py adds MDOWNPOUR, and DiLoCo where
#: hvd_easgd has it); this script keeps ``METHODS`` as its default.
ALL_METHODS = METHODS + ("mdownpour", "diloco")
#: Chosen by a grid search (0.02-0.4; 0.001-0.01 for eamsgd) at tau 1 and 16, 2 workers,
#: batch 16, 10 epochs: the lowest mean final error, differences under half a point (two test
#: images) counted as ties and broken toward the smaller rate. benchmarks/README.md has the grid.
DEFAULT_LR = {"easgd": 0.2, "eamsgd": 0.005, "downpour": 0.1, "average": 0.2, "sgd": 0.05,
              "mdownpour": 0.001, "diloco": 0.003}
#: Local Nesterov momentum (MDOWNPOUR's 0.99 is on the center: ``MASTER_MOMENTUM``).
MOMENTUM = {"eamsgd": 0.99, "sgd": 0.9}
MASTER_MOMENTUM = 0.99
WEIGHT_DECAY = 1e-4
BETA = 0.9
#: "Stable as tau grows": final error at the largest tau within this of the smallest tau's.
STABILITY_MARGIN = 0.02
#: A final center error at least this high, after having been below 50 %, counts as diverged.
COLLAPSED = 0.8


@dataclass(frozen=True)
class Config:
    method: str
    tau: Optional[int]  # None for sgd

    @property
    def name(self) -> str:
        return self.method if self.tau is None else f"{self.method}-tau{self.tau}"


def parse_lr(items: Sequence[str]) -> Dict[str, float]:
    lrs = dict(DEFAULT_LR)
    for item in items:
        method, sep, value = item.partition("=")
        if not sep or method not in ALL_METHODS:
            raise SystemExit(f"--lr expects METHOD=VALUE with METHOD in {ALL_METHODS}, got {item!r}")
        lrs[method] = float(value)
    return lrs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None,
                   help=f"default: {' '.join(METHODS)}")
    p.add_argument("--taus", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--batch", type=int, default=16, help="per-worker batch size")
    p.add_argument("--epochs", type=float, default=20,
                   help="budget: passes over each worker's shard (same for every method)")
    p.add_argument("--steps", type=int, default=None,
                   help="budget in steps per worker instead of --epochs")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations of the center (default: one epoch)")
    p.add_argument("--target", type=float, default=0.10, help="test error to reach")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR",
                   help=f"learning-rate overrides; defaults {DEFAULT_LR}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a fast run: 4 epochs, taus 1 and 16 unless --taus/--epochs/--steps given")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="figure: center test error vs wall-clock, a panel per tau")
    args = p.parse_args(argv)
    given = sys.argv if argv is None else argv
    if args.methods is None:
        args.methods = list(METHODS)
    if args.quick:
        if "--taus" not in given:
            args.taus = [1, 16]
        if args.steps is None and "--epochs" not in given:
            args.epochs = 4
    if any(t < 1 for t in args.taus):
        p.error("every tau must be >= 1")
    if args.batch < 1 or (args.steps is not None and args.steps < 1) or args.epochs <= 0:
        p.error("--batch, --steps and --epochs must be positive")
    args.lrs = parse_lr(args.lr)
    return args


def build_configs(methods: Sequence[str], taus: Sequence[int]) -> List[Config]:
    configs = [Config("sgd", None)] if "sgd" in methods else []
    for tau in taus:
        configs += [Config(m, tau) for m in methods if m != "sgd"]
    return configs


def make_optimizer(config: Config, model: torch.nn.Module, lrs: Dict[str, float]):
    return build_optimizer(config, model, lrs[config.method])


def build_optimizer(config: Config, model: torch.nn.Module, lr: float):
    """The method's optimizer at learning rate ``lr`` (sync mode for every elastic method)."""
    import hvd_easgd

    momentum = MOMENTUM.get(config.method, 0.0)
    if config.method == "diloco":  # DiLoCo's inner AdamW, the outer step hvd_easgd's default
        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    else:
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               nesterov=momentum > 0, weight_decay=WEIGHT_DECAY)
    if config.method == "sgd":
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    method = "easgd" if config.method == "eamsgd" else config.method
    extra: Dict[str, Any] = {"beta": None if method == "diloco" else BETA}
    if method == "mdownpour":
        extra["master_momentum"] = MASTER_MOMENTUM
    return hvd_easgd.ElasticOptimizer(base, model.named_parameters(), tau=config.tau,
                                      method=method, mode="sync", **extra)


@torch.no_grad()
def center_error(model: torch.nn.Module, loader) -> float:
    """Test error over the whole test set (each worker its share, summed over workers)."""
    model.eval()
    wrong = total = 0
    for x, y in loader:
        wrong += int((model(x).argmax(1) != y).sum())
        total += len(y)
    model.train()
    counts = hvd.allreduce(torch.tensor([wrong, total], dtype=torch.float64), op=hvd.Sum,
                           name="accuracy.eval")
    return float(counts[0] / counts[1])


def run_config(config: Config, args: argparse.Namespace, bundle, total_steps: int,
               eval_every: int) -> Dict[str, Any]:
    """Train one configuration; return its history of (seconds, steps, center test error)."""
    from hvd_easgd.train.data import eval_loader, train_loader
    from hvd_easgd.train.models import build_model

    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(args.seed)
    model = build_model("digits_net", bundle.num_classes, in_channels=1)
    center_model = build_model("digits_net", bundle.num_classes, in_channels=1)
    opt = make_optimizer(config, model, args.lrs)
    train = train_loader(bundle.train, args.batch, rank=rank, world_size=size, seed=args.seed)
    test = eval_loader(bundle.test, 256, rank=rank, world_size=size)
    torch.manual_seed(args.seed + 1 + rank)  # dropout: the same stream for every configuration

    def evaluate() -> float:
        if config.method == "sgd":
            return center_error(model, test)
        center_model.load_state_dict(opt.center_state_dict(), strict=False)
        return center_error(center_model, test)

    history = [(0.0, 0, evaluate())]
    losses: List[float] = []
    clock, step, epoch, diverged = 0.0, 0, 0, False
    while step < total_steps and not diverged:
        train.sampler.set_epoch(epoch)
        batches = iter(train)
        while step < total_steps:
            started = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            clock += time.perf_counter() - started
            step += 1
            losses.append(loss.detach().item())
            if step % eval_every == 0 or step == total_steps:
                # Job-wide: the slowest worker's clock; divergence on any worker stops all.
                flags = hvd.allreduce(
                    torch.tensor([clock, 0.0 if math.isfinite(losses[-1]) else 1.0],
                                 dtype=torch.float64), op=hvd.Max, name="accuracy.clock")
                diverged = bool(flags[1] > 0)
                error = 1.0 - 1.0 / bundle.num_classes if diverged else evaluate()
                history.append((float(flags[0]), step, error))
                if diverged:
                    break
        epoch += 1
    if config.method != "sgd":
        opt.close()
    errors = [e for _, _, e in history]
    # Also a collapse without NaNs: it had learned (< 50 % error), then fell back to chance.
    diverged = diverged or (min(errors) < 0.5 and errors[-1] >= COLLAPSED)
    reached = next(((t, s) for t, s, e in history if e <= args.target), (None, None))
    return {
        "config": config.name, "method": config.method, "tau": config.tau,
        "lr": args.lrs[config.method], "momentum": MOMENTUM.get(config.method, 0.0),
        "final_error": errors[-1], "best_error": min(errors), "diverged": diverged,
        "seconds": history[-1][0], "steps": history[-1][1],
        "time_to_target": reached[0], "steps_to_target": reached[1],
        "final_train_loss": sum(losses[-eval_every:]) / max(1, len(losses[-eval_every:])),
        "history": [{"seconds": t, "steps": s, "error": e} for t, s, e in history],
    }


def findings(results: Dict[str, Dict[str, Any]], taus: Sequence[int]) -> List[str]:
    """The paper's qualitative claims, checked against this run's numbers, either way."""
    lines: List[str] = []
    if len(taus) < 2:
        return ["(one tau only: nothing to say about behaviour as tau grows)"]
    lo, hi = min(taus), max(taus)

    def final(method: str, tau: int) -> Optional[Dict[str, Any]]:
        return results.get(f"{method}-tau{tau}")

    for method, claim in (("easgd", "stays stable"), ("eamsgd", "stays stable"),
                          ("downpour", "degrades")):
        a, b = final(method, lo), final(method, hi)
        if a is None or b is None:
            continue
        worse = b["diverged"] or b["final_error"] > a["final_error"] + STABILITY_MARGIN
        holds = worse if claim == "degrades" else not worse
        lines.append(
            f"{method.upper()} {claim} as tau grows (paper): "
            f"{'HOLDS' if holds else 'DOES NOT HOLD'} here: final center error "
            f"{a['final_error']:.1%} at tau={lo} -> {b['final_error']:.1%} at tau={hi}"
            + (" (diverged)" if b["diverged"] else ""))
    for tau in taus:
        mine = final("eamsgd", tau)
        others = [r for r in results.values()
                  if r["method"] != "eamsgd" and (r["tau"] in (tau, None))]
        if mine is None or not others:
            continue
        best_other = min(others, key=lambda r: r["final_error"])
        lines.append(
            f"EAMSGD beats every baseline at tau={tau} (paper): "
            f"{'HOLDS' if mine['final_error'] < best_other['final_error'] else 'DOES NOT HOLD'}"
            f" here: {mine['final_error']:.1%} vs best other {best_other['config']} "
            f"{best_other['final_error']:.1%}")
    return lines


def plot(results: Dict[str, Dict[str, Any]], taus: Sequence[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(taus), 2)
    rows = math.ceil(len(taus) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False,
                             sharey=True)
    styles = {"easgd": "C0", "eamsgd": "C1", "downpour": "C2", "average": "C3", "sgd": "k"}
    for ax, tau in zip(axes.flat, taus):
        for r in results.values():
            if r["tau"] not in (tau, None):
                continue
            xs = [h["seconds"] for h in r["history"]]
            ys = [100 * h["error"] for h in r["history"]]
            label = "sync SGD (hvd.DistributedOptimizer)" if r["method"] == "sgd" else r["method"]
            ax.plot(xs, ys, color=styles[r["method"]], label=label,
                    linestyle="--" if r["method"] == "sgd" else "-")
        ax.set_title(f"tau = {tau}")
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("center test error (%)")
        ax.set_ylim(0, 30)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(taus):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--protocol" in argv:  # the paper's protocol lives in benchmarks/protocol.py
        from benchmarks import protocol

        at = argv.index("--protocol")
        if argv[at + 1:at + 2] != ["paper"]:
            raise SystemExit("--protocol takes one value: paper")
        return protocol.main(argv[:at] + argv[at + 2:])
    args = parse_args(argv)
    hvd.init()
    setup_worker(args.threads)
    from hvd_easgd.train.data import build_datasets

    rank, size = hvd.rank(), hvd.size()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    bundle = build_datasets("digits")
    steps_per_epoch = (len(bundle.train) // size) // args.batch
    total_steps = args.steps or max(1, round(args.epochs * steps_per_epoch))
    eval_every = args.eval_every or steps_per_epoch
    configs = build_configs(args.methods, args.taus)
    log(f"digits: {len(bundle.train)} train / {len(bundle.test)} test, {size} workers, batch "
        f"{args.batch}, {total_steps} steps per worker ({total_steps / steps_per_epoch:.1f} "
        f"epochs of a shard), {len(configs)} configurations, lr {args.lrs}")
    results: Dict[str, Dict[str, Any]] = {}
    started = time.perf_counter()
    for config in configs:
        result = run_config(config, args, bundle, total_steps, eval_every)
        results[config.name] = result
        log(f"{config.name:>16}: final error {result['final_error']:6.1%}, best "
            f"{result['best_error']:6.1%}, {result['seconds']:6.1f} s"
            + (", DIVERGED" if result["diverged"] else ""))
    payload = {
        "benchmark": "accuracy",
        "config": {k: v for k, v in vars(args).items() if k != "lr"} | {
            "world_size": size, "total_steps": total_steps, "eval_every": eval_every,
            "steps_per_epoch": steps_per_epoch, "beta": BETA, "weight_decay": WEIGHT_DECAY,
            "momentum": MOMENTUM, "job_seconds": time.perf_counter() - started},
        "environment": environment(),
        "results": list(results.values()),
        "findings": findings(results, args.taus),
    }
    if rank == 0:
        print(render(payload))
        write_json(args.json, payload)
        if args.png:
            plot(results, args.taus, args.png,
                 f"digits, {size} workers, batch {args.batch}/worker, {total_steps} steps/worker")
    return payload


def render(payload: Dict[str, Any]) -> str:
    cfg = payload["config"]
    headers = ["method", "tau", "lr", "final error", "best error",
               f"time to {cfg['target']:.0%} (s)", f"steps to {cfg['target']:.0%}",
               "train time (s)", "diverged"]
    rows = [[r["method"], r["tau"] or "-", r["lr"], f"{r['final_error']:.1%}",
             f"{r['best_error']:.1%}", r["time_to_target"], r["steps_to_target"], r["seconds"],
             "yes" if r["diverged"] else "no"] for r in payload["results"]]
    return "\n".join([
        f"## accuracy: digits, {cfg['world_size']} workers, batch {cfg['batch']}/worker, "
        f"{cfg['total_steps']} steps/worker, center evaluated every {cfg['eval_every']} steps",
        "", format_table(headers, rows), "", "paper's qualitative findings, here:",
        *(f"- {line}" for line in payload["findings"]),
    ])


if __name__ == "__main__":
    main()
