"""Micro-benchmark of one EASGD round's pieces against the allreduce and a plain optimizer step.

Single process (``python benchmarks/micro.py``: Horovod runs with one worker, so the allreduce
is only a local copy) or under ``horovodrun -np 2`` for a real allreduce. It times, on the
communication-heavy model (``--hidden`` sets its width):

- a forward+backward pass and a plain ``SGD(momentum=0.9).step()``: the work the round's
  overhead should be small against;
- the local math of one round, piece by piece, exactly as :class:`hvd_easgd.ElasticOptimizer`
  does it: ``FlatGroup.gather`` (snapshot into the flat buffer), the difference to the
  center, ``ElasticRule.apply`` (easgd, downpour, average), ``FlatGroup.scatter_add``;
- the fused allreduce of the flat buffer (uncompressed, and fp16 with its cast there and back);
- a whole ``ElasticOptimizer.step()`` at ``tau=1`` (every step a round) and ``tau=16``.

Each number is the median of ``--repeats`` timings; the table also shows it as a multiple of the
plain optimizer step and amortised per step at ``tau=16``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from benchmarks.common import (
    HEAVY_HIDDEN,
    environment,
    format_table,
    heavy_mlp,
    param_bytes,
    setup_worker,
    write_json,
)

AMORTISE_TAU = 16


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=HEAVY_HIDDEN,
                   help="width of the heavy MLP (4096 gives ~25.2 M parameters)")
    p.add_argument("--batch", type=int, default=32, help="batch of the forward+backward timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per piece (median shown)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    hvd.init()
    setup_worker(args.threads)
    import hvd_easgd
    from hvd_easgd.elastic import ElasticRule
    from hvd_easgd.flat import group_tensors

    torch.manual_seed(0)
    model = heavy_mlp(args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    base = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))

    def forward_backward() -> None:
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()

    forward_backward()
    pieces: Dict[str, float] = {}
    r = args.repeats
    pieces["forward+backward (batch %d)" % args.batch] = median_seconds(forward_backward, r)
    pieces["plain SGD(momentum) step"] = plain = median_seconds(base.step, r)

    # The round's local math on the same flat layout the optimizer builds.
    (group,) = group_tensors(list(model.named_parameters()))
    center, snapshot, total = group.new_buffer(), group.new_buffer(), group.new_buffer()
    center_views, snap_views = group.views(center), group.views(snapshot)
    group.gather(center_views)
    total.zero_()
    world = hvd.size()
    pieces["gather: snapshot params -> flat"] = median_seconds(
        lambda: group.gather(snap_views), r)
    pieces["difference: flat - center"] = median_seconds(lambda: snapshot.sub_(center), r)
    for method in ("easgd", "downpour", "average"):
        rule = ElasticRule(method, alpha=0.9 / world, world_size=world)
        pieces[f"ElasticRule.apply ({method})"] = median_seconds(
            lambda: rule.apply(center, snapshot, total), r)
    pieces["scatter_add: flat -> params"] = median_seconds(
        lambda: group.scatter_add(snap_views), r)
    local_math = (pieces["gather: snapshot params -> flat"] + pieces["difference: flat - center"]
                  + pieces["ElasticRule.apply (easgd)"] + pieces["scatter_add: flat -> params"])

    counter = iter(range(10**9))

    def allreduce(compression: Any) -> Callable[[], None]:
        def run() -> None:
            wire, ctx = compression.compress(snapshot)
            handle = hvd.grouped_allreduce_async([wire], op=hvd.Sum,
                                                 name=f"micro.{next(counter)}")
            compression.decompress(hvd.synchronize(handle)[0], ctx)
        return run

    pieces["allreduce (fp32)"] = allreduce_s = median_seconds(allreduce(hvd.Compression.none), r)
    pieces["allreduce (fp16 incl. casts)"] = median_seconds(allreduce(hvd.Compression.fp16), r)

    # A whole optimizer step, gradients already in place (the same backward is reused).
    whole: Dict[int, float] = {}
    for tau in (1, AMORTISE_TAU):
        sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        with hvd_easgd.ElasticOptimizer(sgd, model.named_parameters(), tau=tau,
                                        check_consistency=False) as opt:
            forward_backward()
            # Whole rounds only: `tau` steps per timing.
            whole[tau] = median_seconds(lambda: [opt.step() for _ in range(tau)],
                                        max(3, r // 2) if tau > 1 else r) / tau
    pieces["ElasticOptimizer.step, tau=1 (a round every step)"] = whole[1]
    pieces[f"ElasticOptimizer.step, tau={AMORTISE_TAU} (per step)"] = whole[AMORTISE_TAU]

    per_round = {"gather: snapshot params -> flat", "difference: flat - center",
                 "scatter_add: flat -> params", "allreduce (fp32)", "allreduce (fp16 incl. casts)",
                 *(f"ElasticRule.apply ({m})" for m in ("easgd", "downpour", "average"))}
    rows = []
    for name, seconds in pieces.items():
        per_step = seconds / AMORTISE_TAU if name in per_round else seconds
        rows.append({"piece": name, "ms": 1000 * seconds, "x_plain_step": seconds / plain,
                     "once_per_round": name in per_round,
                     f"ms_per_step_at_tau{AMORTISE_TAU}": 1000 * per_step})
    summary = {
        "local_math_ms": 1000 * local_math,
        "allreduce_ms": 1000 * allreduce_s,
        "local_math_over_allreduce": local_math / allreduce_s,
        "round_overhead_ms": 1000 * (whole[1] - plain),
        "local_math_over_plain_step": local_math / plain,
    }
    payload = {
        "benchmark": "micro",
        "config": {**vars(args), "world_size": world, "parameters": n_params,
                   "param_bytes": param_bytes(model)},
        "environment": environment(),
        "pieces": rows,
        "summary": summary,
    }
    if hvd.rank() == 0:
        print(render(payload))
        write_json(args.json, payload)
    return payload


def render(payload: Dict[str, Any]) -> str:
    cfg, s = payload["config"], payload["summary"]
    key = f"ms_per_step_at_tau{AMORTISE_TAU}"
    table = format_table(
        ["piece", "ms", "x plain step", f"ms per step at tau={AMORTISE_TAU}"],
        [[r["piece"], r["ms"], r["x_plain_step"], r[key]] for r in payload["pieces"]])
    return "\n".join([
        f"## micro: heavy MLP ({cfg['parameters']:,} parameters, "
        f"{cfg['param_bytes'] / 2**20:.1f} MiB), {cfg['world_size']} worker(s), "
        f"median of {cfg['repeats']}",
        "",
        table,
        "",
        f"round's local math (gather + difference + easgd apply + scatter_add): "
        f"{s['local_math_ms']:.1f} ms = {s['local_math_over_plain_step']:.2f} x a plain step, "
        f"{s['local_math_over_allreduce']:.2f} x the allreduce ({s['allreduce_ms']:.1f} ms)",
    ])


if __name__ == "__main__":
    main()
