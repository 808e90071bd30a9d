"""Micro-benchmark of one EASGD round's local math against the allreduce and a plain optimizer step.

Single process (``python benchmarks/micro.py``: Horovod runs with one worker, so the allreduce
is only a local copy) or under ``horovodrun -np 2`` for a real allreduce. It times, on the
communication-heavy model (``--hidden`` sets its width):

- a forward+backward pass and a plain ``SGD(momentum=0.9).step()`` (torch's default on the CPU,
  and with ``foreach=True``): the work the round's overhead should be small against;
- ``a += s * b`` on two flat parameter-sized buffers (3 streams, in place like most of the
  round's ops), which measures what one pass over parameter-sized memory (one *stream*) costs
  on this machine;
- the local math of one round, exactly as :class:`hvd_easgd.ElasticOptimizer` (method ``easgd``)
  does it now, by calling the real :class:`~hvd_easgd.optim.center.CenterState`,
  :class:`~hvd_easgd.optim.rules.ElasticRule` and :class:`~hvd_easgd.optim.flat.FlatGroup` methods on a
  ``CenterState`` built the way the optimizer builds it:

  - sync mode: ``seal(slot, from_live=True)`` (``d = x - c`` written straight into the round
    buffer), ``round_is_finite(totals)``, ``ElasticRule.apply`` (``c += alpha * total``) and the
    pull ``FlatGroup.scatter_add(d, alpha=-alpha)``;
  - async mode: ``snapshot`` (a gather of the live parameters) then ``seal`` (``d = snapshot -
    c``), then the same three pieces;

  each piece alone and each mode's whole sequence in one timing;
- the fused allreduce of the flat buffer (uncompressed, and fp16 with its cast there and back);
- a whole ``ElasticOptimizer.step()`` at ``tau=1`` (every step a round) and ``tau=16``.

Every row also shows its *memory traffic floor*: how many parameter-sized streams it reads and
writes (``d = x - c``: 3; the finiteness sum: 1; ``c += alpha * total``: 3; ``x += s * d``: 3;
the momentum step ``buf = m * buf + g; x -= lr * buf``: 8), the multiple of the plain step that
those streams alone imply, and the time they take at the probe's bandwidth. These ops do one
multiply-add per element or less, so bandwidth, not arithmetic, bounds them. (An out-of-place
write, as in ``seal(from_live=True)`` and ``snapshot``, also costs the CPU a read of the
destination, so those run somewhat slower per counted stream than the in-place ones.)

Each number is the median of ``--repeats`` timings; the table also shows it as a multiple of the
plain optimizer step and amortised per step at ``tau=16``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
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
#: The issue's target for the round's local math, as a multiple of a plain optimizer step.
TARGET_X_PLAIN = 0.5

# Parameter-sized streams each piece reads + writes (its memory traffic floor).
PLAIN_STREAMS = 8  # buf.mul_(m) 2, buf.add_(g) 3, p.add_(buf, alpha=-lr) 3
STREAMS = {
    "probe": 3,  # a += s * b, in place: read a, read b, write a
    "snapshot": 2,  # gather: read x, write the round buffer
    "seal_live": 3,  # d = x - c: read x, read c, write d
    "seal": 3,  # d = snapshot - c, in place: read d, read c, write d
    "finite": 1,  # sum(total): read
    "rule": 3,  # c += alpha * total: read c, read total, write c
    "pull": 3,  # x += s * d: read x, read d, write x
}
SYNC_PIECES = ("seal_live", "finite", "rule", "pull")
ASYNC_PIECES = ("snapshot", "seal", "finite", "rule", "pull")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=HEAVY_HIDDEN,
                   help="width of the heavy MLP (4096 gives ~25.2 M parameters)")
    p.add_argument("--batch", type=int, default=32, help="batch of the forward+backward timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per piece (median shown)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here (rank 0)")
    p.add_argument("--fused", action="store_true",
                   help="also time the round's update as one torch.compile'd pass (slow to "
                        "compile; needs a C++ compiler)")
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


class RoundMath:
    """A round's local math on a ``CenterState`` laid out exactly as ``ElasticOptimizer``'s.

    Built as the optimizer builds it (``group_tensors`` of the named parameters, a
    ``CenterState`` with 1 round slot in sync mode and 2 in async mode, ``reset_from_live``,
    ``allocate_rounds``); each method is one piece of the optimizer's round, calling the same
    methods with the same arguments (``Rounds._start``/``_seal``/``apply`` in ``hvd_easgd.optim.rounds``).
    ``totals`` stands for the allreduce's output: a separate buffer holding a realistic sum.
    """

    def __init__(self, model: torch.nn.Module, mode: str, alpha: float, world: int) -> None:
        from hvd_easgd.optim.center import CenterState
        from hvd_easgd.optim.rules import ElasticRule, buffer_rule
        from hvd_easgd.optim.flat import group_tensors

        self.groups = group_tensors(list(model.named_parameters()), [])
        self.state = CenterState(self.groups, velocity=False, average=False,
                                 slots=2 if mode == "async" else 1)
        self.state.reset_from_live()
        self.state.allocate_rounds()
        self.rule = ElasticRule("easgd", alpha, world)
        self.buffer_rule = buffer_rule(world)
        self.slot = 0
        gen = torch.Generator().manual_seed(0)  # a round's sum: small, finite, not zero
        self.totals = [1e-3 * torch.randn(b.shape, generator=gen, dtype=b.dtype)
                       for b in self.state.rounds[self.slot]]

    def snapshot(self) -> None:
        self.state.snapshot(self.slot)

    def seal_live(self) -> None:
        self.state.seal(self.slot, from_live=True)

    def seal(self) -> None:
        self.state.seal(self.slot)

    def finite(self) -> None:
        if not self.state.round_is_finite(self.totals):
            raise RuntimeError("the micro-benchmark's round sum is not finite")

    @torch.no_grad()
    def rule_apply(self) -> List[float]:
        """The center's update, as ``ElasticOptimizer._apply`` calls it; the pull scales."""
        scales = []
        for gi, group in enumerate(self.groups):
            center = self.state.centers[gi]
            diff, total = self.state.rounds[self.slot][gi], self.totals[gi]
            n = group.param_numel
            scales.append(self.rule.apply(center[:n], diff[:n], total[:n]) if n else 1.0)
            if n < group.numel:
                self.buffer_rule.apply(center[n:], diff[n:], total[n:])
        return scales

    def pull(self, scales: Optional[List[float]] = None) -> None:
        scales = scales or [-self.rule.alpha] * len(self.groups)
        for group, views, scale in zip(self.groups, self.state.round_views[self.slot], scales):
            group.scatter_add(views, alpha=scale)

    def piece(self, name: str) -> Callable[[], Any]:
        return {"snapshot": self.snapshot, "seal_live": self.seal_live, "seal": self.seal,
                "finite": self.finite, "rule": self.rule_apply, "pull": self.pull}[name]

    def sync_round(self) -> None:
        """``Rounds._start`` (seal from live) then ``Rounds.apply`` (check, rule, pull)."""
        self.seal_live()
        self.finite()
        self.pull(self.rule_apply())

    def async_round(self) -> None:
        """``snapshot`` before the local step, ``_seal`` after it, then ``_apply``."""
        self.snapshot()
        self.seal()
        self.finite()
        self.pull(self.rule_apply())


@dataclass
class Row:
    piece: str
    seconds: float
    streams: Optional[int] = None
    once_per_round: bool = False
    cpu_seconds: Optional[float] = None  # this process's CPU per call, every thread


PIECE_LABELS = {
    "snapshot": "async: CenterState.snapshot (gather x -> round buffer)",
    "seal": "async: CenterState.seal (d = snapshot - c)",
    "seal_live": "sync: CenterState.seal(from_live=True) (d = x - c)",
    "finite": "CenterState.round_is_finite(totals) (one sum)",
    "rule": "ElasticRule.apply (easgd: c += alpha * total)",
    "pull": "FlatGroup.scatter_add (pull: x += -alpha * d)",
}
SYNC_LABEL = "round's local math, sync (seal from live + check + rule + pull)"
ASYNC_LABEL = "round's local math, async (snapshot + seal + check + rule + pull)"
PLAIN_LABEL = "plain SGD(momentum) step (torch default)"
PROBE_LABEL = "flat a += s * b over the parameters (bandwidth probe)"


def time_round_math(model: torch.nn.Module, world: int, repeats: int) -> List[Row]:
    """Every piece of both modes' round math, then each mode's whole sequence in one timing."""
    saved = [p.detach().clone() for p in model.parameters()]
    alpha = 0.9 / world
    rows: List[Row] = []
    for mode, pieces, label in (("sync", SYNC_PIECES, SYNC_LABEL),
                                ("async", ASYNC_PIECES, ASYNC_LABEL)):
        math = RoundMath(model, mode, alpha, world)
        done = {r.piece for r in rows}
        for name in pieces:
            if PIECE_LABELS[name] not in done:
                rows.append(Row(PIECE_LABELS[name], median_seconds(math.piece(name), repeats),
                                STREAMS[name], True))
        whole = math.sync_round if mode == "sync" else math.async_round
        rows.append(Row(label, median_seconds(whole, repeats),
                        sum(STREAMS[n] for n in pieces), True))
        del math
    with torch.no_grad():  # the pulls moved the model a little: put it back
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    return rows


def flat_copy(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def time_probe(model: torch.nn.Module, repeats: int) -> Row:
    """``a += s * b`` over two flat parameter-sized buffers: the cost of 3 streams."""
    a, b = torch.zeros_like(flat_copy(model)), flat_copy(model)
    return Row(PROBE_LABEL, median_seconds(lambda: a.add_(b, alpha=0.5), repeats),
               STREAMS["probe"])


MEAN_ON_WIRE_LABEL = ("alternative: the mean on the wire, eager (x.lerp_(c, a); c.lerp_(m, b); "
                      "finiteness sum of m)")
FUSED_LABEL = "alternative: one fused pass, torch.compile (reads x, c, m; writes x, c)"


def time_alternatives(model: torch.nn.Module, world: int, repeats: int,
                      fused: bool) -> List[Row]:
    """What the round's math could cost if the wire carried the workers' mean ``m`` of ``x``
    (Horovod's op=Average) instead of ``d = x - c``: no ``d`` to write, so 7 streams eagerly
    (pull 3, center 3, check 1), and 5 in one fused pass (read x, c, m; write x, c), which is
    the floor of ANY implementation of the round's update. The model's parameters are one
    flat buffer here (optimistic: the real ones are separate tensors). ``fused`` also times
    that pass compiled by ``torch.compile`` (needs a C++ compiler; compiling takes a while)."""
    x, c = flat_copy(model), flat_copy(model)
    m = c + 1e-3
    alpha, beta = 0.9 / world, 0.9

    def eager() -> None:
        bool(torch.isfinite(m.sum()))
        x.lerp_(c, alpha)
        c.lerp_(m, beta)

    rows = [Row(MEAN_ON_WIRE_LABEL, median_seconds(eager, repeats), 7, True)]
    if fused:
        def one_pass(x_: torch.Tensor, c_: torch.Tensor, m_: torch.Tensor) -> torch.Tensor:
            ok = torch.isfinite(m_).all()
            new_x = x_ + alpha * (c_ - x_)
            c_.copy_(c_ + beta * (m_ - c_))
            x_.copy_(new_x)
            return ok

        compiled = torch.compile(one_pass, dynamic=False)
        bool(compiled(x, c, m))  # compile
        rows.append(Row(FUSED_LABEL, median_seconds(lambda: bool(compiled(x, c, m)), repeats),
                        5, True))
    return rows


ALLREDUCE_LABEL = "allreduce (fp32), hvd-easgd's Communicator (kept output)"
ALLREDUCES = {  # label: (compression, whether the output is kept)
    ALLREDUCE_LABEL: ("none", True),
    "allreduce (fp32), hvd.grouped_allreduce_async (new output per call)": ("none", False),
    "allreduce (fp16 incl. casts), hvd-easgd's Communicator (kept buffers)": ("fp16", True),
    "allreduce (fp16 incl. casts), Horovod's compressor (new buffers per call)": ("fp16", False),
}


def process_cpu() -> float:
    """CPU seconds of this process so far, every thread (Horovod's and Gloo's included)."""
    t = os.times()
    return t.user + t.system


def time_allreduces(model: torch.nn.Module, repeats: int) -> List[Row]:
    """The round's allreduce of a parameter-sized flat buffer, fp32 and fp16, as the optimizer
    starts it (:class:`hvd_easgd.optim.exchange.Communicator`: Horovod's output and the fp16 casts kept
    from round to round) and as ``hvd.grouped_allreduce_async`` with Horovod's compressor does
    (new tensors every call). Each row also has the process's CPU time per call: a new 100 MB
    output costs page faults and an ``munmap`` on top of the copy and the sum."""
    from hvd_easgd.optim.exchange import Communicator, ExchangeStats

    flat = flat_copy(model)
    counter = iter(range(10**9))

    def fresh(compression: Any) -> Callable[[], None]:
        def run() -> None:
            wire, ctx = compression.compress(flat)
            handle = hvd.grouped_allreduce_async([wire], op=hvd.Sum,
                                                 name=f"micro.{next(counter)}")
            compression.decompress(hvd.synchronize(handle)[0], ctx)
        return run

    def kept(compression: Any) -> Callable[[], None]:
        comm = Communicator(compression, f"micro.kept.{next(counter)}", ExchangeStats())
        return lambda: comm.wait(comm.start([flat], next(counter)))

    rows = []
    for label, (name, keep) in ALLREDUCES.items():
        compression = getattr(hvd.Compression, name)
        run = kept(compression) if keep else fresh(compression)
        cpu: List[float] = []

        def timed(run: Callable[[], None] = run, cpu: List[float] = cpu) -> None:
            before = process_cpu()
            run()
            cpu.append(process_cpu() - before)

        seconds = median_seconds(timed, repeats)
        rows.append(Row(label, seconds, once_per_round=True,
                        cpu_seconds=statistics.median(cpu[1:])))  # [0]: the warm-up
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    hvd.init()
    setup_worker(args.threads)
    import hvd_easgd

    torch.manual_seed(0)
    model = heavy_mlp(args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    base = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    fused = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))

    def forward_backward() -> None:
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()

    forward_backward()
    r = args.repeats
    world = hvd.size()
    rows = [Row("forward+backward (batch %d)" % args.batch, median_seconds(forward_backward, r)),
            Row(PLAIN_LABEL, median_seconds(base.step, r), PLAIN_STREAMS),
            Row("plain SGD(momentum, foreach=True) step", median_seconds(fused.step, r),
                PLAIN_STREAMS)]
    rows.append(time_probe(model, r))
    rows += time_round_math(model, world, r)
    rows += time_alternatives(model, world, r, args.fused)
    rows += time_allreduces(model, r)

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
    rows.append(Row("ElasticOptimizer.step, tau=1 (a round every step)", whole[1]))
    rows.append(Row(f"ElasticOptimizer.step, tau={AMORTISE_TAU} (per step)", whole[AMORTISE_TAU]))

    payload = {
        "benchmark": "micro",
        "config": {**vars(args), "world_size": world, "parameters": n_params,
                   "param_bytes": param_bytes(model)},
        "environment": environment(),
        "pieces": table_rows(rows),
        "summary": summarise(rows, whole),
    }
    if hvd.rank() == 0:
        print(render(payload))
        write_json(args.json, payload)
    return payload


def table_rows(rows: List[Row]) -> List[Dict[str, Any]]:
    by_name = {r.piece: r for r in rows}
    plain = by_name[PLAIN_LABEL].seconds
    probe = by_name[PROBE_LABEL]
    stream_s = probe.seconds / probe.streams
    out = []
    for r in rows:
        per_step = r.seconds / AMORTISE_TAU if r.once_per_round else r.seconds
        out.append({
            "piece": r.piece, "ms": 1000 * r.seconds, "x_plain_step": r.seconds / plain,
            "streams": r.streams,
            "x_plain_step_by_streams": None if r.streams is None else r.streams / PLAIN_STREAMS,
            "floor_ms": None if r.streams is None else 1000 * r.streams * stream_s,
            "once_per_round": r.once_per_round,
            "cpu_ms": None if r.cpu_seconds is None else 1000 * r.cpu_seconds,
            f"ms_per_step_at_tau{AMORTISE_TAU}": 1000 * per_step,
        })
    return out


def summarise(rows: List[Row], whole: Dict[int, float]) -> Dict[str, Any]:
    by_name = {r.piece: r for r in rows}
    plain = by_name[PLAIN_LABEL].seconds
    allreduce = by_name[ALLREDUCE_LABEL].seconds
    probe = by_name[PROBE_LABEL]
    stream_s = probe.seconds / probe.streams
    summary: Dict[str, Any] = {
        "plain_step_ms": 1000 * plain,
        "plain_streams": PLAIN_STREAMS,
        "stream_ms": 1000 * stream_s,
        "plain_step_over_its_floor": plain / (PLAIN_STREAMS * stream_s),
        "allreduce_ms": 1000 * allreduce,
        "round_overhead_ms": 1000 * (whole[1] - plain),
        "allreduce_cpu_ms": {r.piece: 1000 * r.cpu_seconds for r in rows
                             if r.cpu_seconds is not None},
        "target_x_plain_step": TARGET_X_PLAIN,
        "target_streams": int(TARGET_X_PLAIN * PLAIN_STREAMS),
    }
    for mode, label in (("sync", SYNC_LABEL), ("async", ASYNC_LABEL)):
        row = by_name[label]
        summary[mode] = {
            "local_math_ms": 1000 * row.seconds,
            "local_math_over_plain_step": row.seconds / plain,
            "streams": row.streams,
            "streams_over_plain": row.streams / PLAIN_STREAMS,
            "floor_ms": 1000 * row.streams * stream_s,
            "local_math_over_allreduce": row.seconds / allreduce,
            "meets_target": row.seconds / plain <= TARGET_X_PLAIN,
        }
    # Kept for readers of older JSON: the sync round.
    summary["local_math_ms"] = summary["sync"]["local_math_ms"]
    summary["local_math_over_plain_step"] = summary["sync"]["local_math_over_plain_step"]
    return summary


def render(payload: Dict[str, Any]) -> str:
    cfg, s = payload["config"], payload["summary"]
    key = f"ms_per_step_at_tau{AMORTISE_TAU}"
    table = format_table(
        ["piece", "ms", "x plain step", "streams", "x plain by streams", "floor ms",
         f"ms per step at tau={AMORTISE_TAU}"],
        [[r["piece"], r["ms"], r["x_plain_step"], r["streams"], r["x_plain_step_by_streams"],
          r["floor_ms"], r[key]]
         for r in payload["pieces"]])
    lines = [
        f"## micro: heavy MLP ({cfg['parameters']:,} parameters, "
        f"{cfg['param_bytes'] / 2**20:.1f} MiB), {cfg['world_size']} worker(s), "
        f"median of {cfg['repeats']}",
        "",
        table,
        "",
        f"one stream (a parameter-sized read or write) = {s['stream_ms']:.2f} ms at the "
        f"probe's bandwidth; the plain step ({s['plain_streams']} streams) runs at "
        f"{s['plain_step_over_its_floor']:.2f} x its floor",
    ]
    for mode in ("sync", "async"):
        m = s[mode]
        lines.append(
            f"round's local math, {mode}: {m['local_math_ms']:.2f} ms = "
            f"{m['local_math_over_plain_step']:.2f} x a plain step (target <= "
            f"{s['target_x_plain_step']:.2f}: {'met' if m['meets_target'] else 'missed'}); "
            f"memory traffic floor {m['streams']} streams = {m['streams_over_plain']:.2f} x the "
            f"plain step's {s['plain_streams']} ({m['floor_ms']:.1f} ms); "
            f"{m['local_math_over_allreduce']:.2f} x the allreduce ({s['allreduce_ms']:.1f} ms)")
    lines.append(f"the target ({s['target_x_plain_step']:.2f} x a plain step) allows at most "
                 f"{s['target_streams']} streams per round when both run at the same bandwidth")
    cpu = s.get("allreduce_cpu_ms") or {}
    if cpu:
        lines += ["", "CPU per allreduce, this process (every thread; wall in the table):"]
        lines += [f"  {ms:7.1f} ms  {label}" for label, ms in cpu.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
