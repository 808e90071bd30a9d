"""Throughput and communication of EASGD against Horovod's synchronous SGD, in one job.

Run under Horovod (CPU/Gloo here, GPUs elsewhere)::

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/throughput.py --model heavy \
        --json runs/bench/throughput_heavy.json
    horovodrun -np 4 python benchmarks/throughput.py --model cifar --device cuda

It trains one fixed model on synthetic batches with every variant, side by side:

1. ``no-comm``: each worker alone with the plain optimizer (the upper limit);
2. ``hvd-sgd``: ``hvd.DistributedOptimizer`` (synchronous data-parallel SGD);
3. ``easgd-sync-tauT`` and 4. ``easgd-async-tauT`` for every ``T`` in ``--taus``;
5. ``downpour-sync-tauB`` and ``average-sync-tauB`` at ``B = --baseline-tau``.

Repetitions are interleaved (every repetition runs every variant, in a rotated order) so that
noise from other jobs on the machine hits every variant alike. Each measurement builds a fresh
model and optimizer from the same seed, takes a few untimed warm-up steps (for EASGD a whole
number of rounds, so an async round is already in flight when timing starts: steady state),
then times a window of whole rounds. Communication is measured by
:class:`~benchmarks.common.CollectiveMeter`, which wraps Horovod's allreduce entry points, so
``hvd.DistributedOptimizer`` is counted by the same instrument as EASGD.

Rank 0 prints a table and, with ``--json PATH``, writes every number; that every EASGD variant
sends exactly the parameter bytes per round is checked and printed.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `hvd_easgd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd
import torch

from benchmarks.common import (
    CollectiveMeter,
    ModelSpec,
    device_sync,
    distribute,
    environment,
    format_table,
    fresh_model,
    machine_busy_seconds,
    model_spec,
    param_bytes,
    resolve_device,
    setup_worker,
    stopwatch,
    synthetic_batch,
    thread_cpu_seconds,
    train_step,
    write_json,
)

@dataclass(frozen=True)
class Variant:
    """One way of training: ``kind`` is ``local``, ``horovod`` or ``elastic``."""

    name: str
    kind: str
    method: Optional[str] = None
    mode: Optional[str] = None
    tau: Optional[int] = None
    start_early: bool = True
    compression: str = "none"  # the wire format of its allreduces: none or fp16


def build_variants(taus: Sequence[int], baseline_tau: int, extra: bool = False,
                   compressions: Sequence[str] = ("none",)) -> List[Variant]:
    """The default variants, once per wire format in ``compressions`` (names of the fp16 ones
    end in ``+fp16``); ``extra`` adds those only ``--only`` asks for: ``easgd-synclate-tauT``,
    sync EASGD with every round started at its own step (``start_early=False``), to measure
    what starting it a step early gains."""
    variants = [Variant("no-comm", "local")]
    for wire in compressions:
        tag = "" if wire == "none" else f"+{wire}"
        found = [Variant("hvd-sgd", "horovod")]
        for mode in ("sync", "async"):
            found += [Variant(f"easgd-{mode}-tau{t}", "elastic", "easgd", mode, t) for t in taus]
        found += [Variant(f"{m}-sync-tau{baseline_tau}", "elastic", m, "sync", baseline_tau)
                  for m in ("downpour", "average")]
        if extra:
            found += [Variant(f"easgd-synclate-tau{t}", "elastic", "easgd", "sync", t, False)
                      for t in taus]
        variants += [replace(v, name=v.name + tag, compression=wire) for v in found]
    return variants


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("cifar", "heavy"), default="heavy",
                   help="cifar: the paper's CIFAR-10 net at 28x28; heavy: a ~25 M-parameter MLP")
    p.add_argument("--hidden", type=int, default=4096,
                   help="width of the heavy MLP (4096 gives ~25.2 M parameters)")
    p.add_argument("--batch", type=int, default=None,
                   help="per-worker batch size (default: 128 for cifar, 32 for heavy)")
    p.add_argument("--steps", type=int, default=32,
                   help="timed steps per measurement, rounded up to whole rounds of each tau")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement "
                   "(rounded up to whole rounds for EASGD)")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions of every variant")
    p.add_argument("--taus", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--baseline-tau", type=int, default=16,
                   help="tau of the downpour and average variants")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                   help="run only these variants (no-comm is always run: it is the reference)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--compression", choices=("none", "fp16"), nargs="+", default=["none"],
                   help="wire formats of the allreduces (hvd.DistributedOptimizer's too); "
                        "every variant runs once per format, fp16 ones named NAME+fp16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda uses GPU hvd.local_rank()")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--polite-wait", action="store_true",
                   help="experiment: wait for collectives by polling with short sleeps instead "
                        "of Horovod's busy-yield synchronize (see benchmarks/README.md)")
    p.add_argument("--rotate", type=int, default=0,
                   help="start the variant order this many places later (the orchestrator "
                        "benchmarks/baselines.py rotates it between its repetitions)")
    p.add_argument("--horovod-defaults", action="store_true",
                   help="keep Horovod's own runtime defaults instead of applying hvd-easgd's "
                        "recommended settings (hvd_easgd.optim.tuning; HVD_EASGD_TUNE=0 does the same)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--steps and --reps must be >= 1 and --warmup >= 0")
    if any(t < 1 for t in args.taus) or args.baseline_tau < 1:
        p.error("every tau must be >= 1")
    return args


def compression_of(name: str) -> Any:
    return hvd.Compression.fp16 if name == "fp16" else hvd.Compression.none


def make_optimizer(variant: Variant, model: torch.nn.Module, base: torch.optim.Optimizer,
                   args: argparse.Namespace):
    """The variant's optimizer around ``base`` (the same SGD with momentum for every variant)."""
    method = {"local": None, "horovod": "sgd"}.get(variant.kind, variant.method)
    extra = {"start_early": variant.start_early} if variant.kind == "elastic" else {}
    return distribute(base, model, method, variant.tau, variant.mode or "sync",
                      compression_of(variant.compression), **extra)


def measure(variant: Variant, spec: ModelSpec, args: argparse.Namespace, meter: CollectiveMeter,
            batch: Sequence[torch.Tensor], device: torch.device) -> Dict[str, float]:
    """Build, warm up and time one variant; every worker returns the same job-wide numbers."""
    model, base = fresh_model(spec, args.lr, device)
    opt = make_optimizer(variant, model, base, args)
    x, y = batch

    def step() -> None:
        train_step(model, opt, x, y)

    tau = variant.tau or 1
    warmup = math.ceil(max(args.warmup, 1 if variant.tau else 0) / tau) * tau
    window = math.ceil(args.steps / tau) * tau  # whole rounds: exactly window / tau of them
    for _ in range(warmup):
        step()
    device_sync(device)
    if variant.kind == "elastic":
        wait_submitted(opt, warmup // tau)
    hvd.barrier()
    before = opt.stats.as_dict() if variant.kind == "elastic" else None
    meter.reset()
    timed = time_steps(step, window, device)
    if variant.kind == "elastic":
        wait_submitted(opt, (warmup + window) // tau)
    counted = meter.snapshot()
    waited = comm_seconds = 0.0
    stalls = 0
    if before is not None:
        after = opt.stats.as_dict()
        waited = after["wait_seconds"] - before["wait_seconds"]
        comm_seconds = after["comm_seconds"] - before["comm_seconds"]
        stalls = after["stalls"] - before["stalls"]
        assert after["bytes_communicated"] - before["bytes_communicated"] == counted["bytes"], (
            "hvd-easgd's own byte counter disagrees with the Horovod-level meter")
        opt.synchronize()
        opt.close()
    # Job-wide: the slowest worker's time; the workers' mean waits (not counted by the meter).
    slowest = hvd.allreduce(torch.tensor([timed["seconds"]], dtype=torch.float64), op=hvd.Max,
                            name=f"bench.elapsed.{variant.name}")
    # The training thread's time blocked on communication: in `synchronize` (hvd-sgd; EASGD
    # sync) or waiting for a background round (EASGD async). hvd-easgd's `wait_seconds` covers
    # its own waits in both modes, which the meter also sees in sync mode: take the larger.
    blocked = max(counted["blocked"], waited)
    means = hvd.allreduce(
        torch.tensor([blocked, waited, comm_seconds, timed["cpu"], timed["main_cpu"],
                      timed["other_cpu"]],
                     dtype=torch.float64),
        op=hvd.Average, name=f"bench.waits.{variant.name}")
    # Other processes' CPU during the window (a shared machine): the machine's busy time seen by
    # rank 0 minus every worker's own CPU; only meaningful when all workers share the machine.
    machine = hvd.broadcast(torch.tensor([timed["busy"]], dtype=torch.float64), root_rank=0,
                            name=f"bench.busy.{variant.name}")
    del opt, model
    gc.collect()
    return {
        "steps": window,
        "seconds": float(slowest[0]),
        "allreduce_calls": counted["calls"],
        "bytes": counted["bytes"],
        "blocked_seconds": float(means[0]),
        "wait_seconds": float(means[1]),
        "comm_seconds": float(means[2]),
        "stalls": stalls,
        "cpu_seconds": float(means[3]),
        "main_thread_cpu_seconds": float(means[4]),
        "other_threads_cpu_seconds": float(means[5]),
        "worker_seconds": timed["seconds"],
        "foreign_cpu_seconds": max(0.0, float(machine[0]) - float(means[3]) * hvd.size()),
    }


def time_steps(step: Any, window: int, device: torch.device) -> Dict[str, float]:
    """Time ``window`` steps: wall-clock, this worker's CPU (every thread: compute and
    communication), its main thread's and its other threads' CPU, the machine's busy CPU."""
    threads_started, busy_started = thread_cpu_seconds(), machine_busy_seconds()
    cpu_started = time.process_time()
    with stopwatch() as elapsed:
        for _ in range(window):
            step()
        device_sync(device)
    busy_ended, cpu = machine_busy_seconds(), time.process_time() - cpu_started
    threads = thread_cpu_seconds()
    known = threads is not None and threads_started is not None
    return {"seconds": elapsed[0], "cpu": cpu,
            "main_cpu": threads["main"] - threads_started["main"] if known else math.nan,
            "other_cpu": threads["others"] - threads_started["others"] if known else math.nan,
            "busy": busy_ended - busy_started if busy_started is not None else math.nan}


def wait_submitted(opt: Any, rounds: int, timeout: float = 300.0) -> None:
    """Wait (untimed) until ``rounds`` rounds have been handed to Horovod.

    In async mode the background thread submits a round shortly after the step that started
    it; waiting here makes every timed window contain exactly its own rounds' allreduces.
    """
    deadline = time.monotonic() + timeout
    while opt.stats.allreduce_calls < rounds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {rounds} was not submitted within {timeout:.0f} s")
        time.sleep(0.001)


def summarise(variant: Variant, runs: List[Dict[str, float]], samples_per_step: int,
              wire_param_bytes: int) -> Dict[str, Any]:
    steps = sum(r["steps"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    total_bytes = sum(r["bytes"] for r in runs)
    tau = variant.tau or 1
    row: Dict[str, Any] = asdict(variant)
    row.update(
        total_steps=steps,
        total_bytes=total_bytes,
        total_allreduce_calls=sum(r["allreduce_calls"] for r in runs),
        samples_per_sec=samples_per_step * steps / seconds,
        allreduce_calls_per_step=sum(r["allreduce_calls"] for r in runs) / steps,
        bytes_per_step=total_bytes / steps,
        comm_share=sum(r["blocked_seconds"] for r in runs) / seconds,
        wait_ms_per_step=1000 * sum(r["wait_seconds"] for r in runs) / steps,
        comm_seconds_per_round=(sum(r["comm_seconds"] for r in runs) / (steps / tau)
                                if variant.kind == "elastic" else None),
        stalls=sum(r["stalls"] for r in runs),
        # CPU time of a worker's process (all its threads) per step, and cores it kept busy.
        cpu_ms_per_step=1000 * sum(r["cpu_seconds"] for r in runs) / steps,
        cores_per_worker=sum(r["cpu_seconds"] for r in runs) / seconds,
        main_thread_cpu_ms_per_step=1000 * sum(r["main_thread_cpu_seconds"] for r in runs) / steps,
        other_threads_cpu_ms_per_step=(
            1000 * sum(r["other_threads_cpu_seconds"] for r in runs) / steps),
        rounds=steps // tau if variant.kind == "elastic" else None,
        # Cores other processes kept busy during the timed windows (see machine_busy_seconds).
        foreign_cores=sum(r.get("foreign_cpu_seconds", float("nan")) for r in runs) / seconds,
        per_rep_samples_per_sec=[samples_per_step * r["steps"] / r["seconds"] for r in runs],
    )
    # Exact integer check of the communication volume: bytes * tau == parameter bytes * steps.
    if variant.kind == "elastic":
        row["bytes_exact"] = total_bytes * tau == wire_param_bytes * steps
        row["bytes_fraction_of_params"] = total_bytes * tau / (wire_param_bytes * steps)
    elif variant.kind == "horovod":
        row["bytes_exact"] = total_bytes == wire_param_bytes * steps
        row["bytes_fraction_of_params"] = total_bytes / (wire_param_bytes * steps)
    else:
        row["bytes_exact"] = total_bytes == 0
        row["bytes_fraction_of_params"] = 0.0
    return row


def add_ratios(rows: Dict[str, Dict[str, Any]], reference: float) -> None:
    """Throughput relative to ``no-comm``: pooled, and paired within each repetition.

    ``ratio`` is pooled throughput over pooled ``no-comm`` throughput. ``ratio_paired`` is the
    median over repetitions of the ratio to the ``no-comm`` run of the *same* repetition,
    which cancels load that drifts between repetitions on a shared machine; the targets use it.
    ``cpu_bound_ratio``: if the workers' cores are saturated, extra CPU work per step (the
    round's local math, Horovod's copies and reduction) cannot hide behind compute, so the
    ratio cannot exceed ``no-comm``'s CPU per step over the variant's.
    """
    base = rows["no-comm"]
    for row in rows.values():
        row["ratio"] = row["samples_per_sec"] / reference
        paired = [mine / ref for mine, ref in zip(row["per_rep_samples_per_sec"],
                                                  base["per_rep_samples_per_sec"])]
        row["per_rep_ratio"] = paired
        row["ratio_paired"] = statistics.median(paired)
        row["cpu_bound_ratio"] = base["cpu_ms_per_step"] / row["cpu_ms_per_step"]


def check_bytes(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Every EASGD variant hands Horovod exactly the parameter bytes (on its wire) per round;
    ``met`` is None when no EASGD variant ran. (Throughput targets: ``baselines.py``, against
    the physical limit.)"""
    elastic = [r for r in rows.values() if r["kind"] == "elastic"]
    return {"target": "bytes/step = parameter bytes / tau (x1/2 with fp16), exactly, every "
                      "EASGD variant",
            "value": ", ".join(f"{r['name']}: {r['bytes_fraction_of_params']:.6g}"
                               for r in elastic),
            "met": all(r["bytes_exact"] for r in elastic) if elastic else None}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    # What hvd-easgd-train and the launchers do: hvd-easgd's Horovod settings (a longer
    # background cycle), unless the user set them or disabled them (HVD_EASGD_TUNE=0).
    from hvd_easgd.optim import apply_horovod_settings, effective_settings

    applied = {} if args.horovod_defaults else apply_horovod_settings()
    horovod_settings = effective_settings()
    hvd.init()
    setup_worker(args.threads)
    device = resolve_device(args.device)
    spec = model_spec(args.model, args.hidden)
    batch_size = args.batch or spec.default_batch
    rank, size = hvd.rank(), hvd.size()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)

    variants = build_variants(args.taus, args.baseline_tau, bool(args.only), args.compression)
    if args.only:
        known = {v.name for v in variants}
        unknown = sorted(set(args.only) - known)
        if unknown:
            raise SystemExit(f"--only: unknown variants {unknown}; choose from {sorted(known)}")
        variants = [v for v in variants if v.name == "no-comm" or v.name in args.only]

    batch = tuple(t.to(device) for t in synthetic_batch(spec, batch_size, rank))
    probe = spec.build()
    n_params = sum(p.numel() for p in probe.parameters())
    pbytes = param_bytes(probe)
    del probe
    log(f"model {args.model}: {n_params:,} parameters ({pbytes / 2**20:.1f} MiB), batch "
        f"{batch_size}/worker, {size} workers, {len(variants)} variants x {args.reps} reps")

    meter = CollectiveMeter(polite_wait=args.polite_wait)
    runs: Dict[str, List[Dict[str, float]]] = {v.name: [] for v in variants}
    try:
        for rep in range(args.reps):
            shift = (rep + args.rotate) % len(variants)
            order = variants[shift:] + variants[:shift]
            for variant in order:
                result = measure(variant, spec, args, meter, batch, device)
                runs[variant.name].append(result)
                log(f"rep {rep + 1}/{args.reps} {variant.name:>22}: "
                    f"{size * batch_size * result['steps'] / result['seconds']:9.1f} samples/s")
    finally:
        meter.close()

    samples_per_step = size * batch_size
    rows = {v.name: summarise(v, runs[v.name], samples_per_step,
                              pbytes // 2 if v.compression == "fp16" else pbytes)
            for v in variants}
    reference = rows["no-comm"]["samples_per_sec"]
    add_ratios(rows, reference)
    targets = [check_bytes(rows)]
    payload = {
        "benchmark": "throughput",
        "config": {**vars(args), "batch": batch_size, "world_size": size,
                   "parameters": n_params, "param_bytes": pbytes,
                   "horovod_settings": horovod_settings, "horovod_settings_applied": applied},
        "environment": environment(),
        "variants": list(rows.values()),
        "targets": targets,
    }
    if rank == 0:
        print(render(payload))
        write_json(args.json, payload)
    hvd.barrier()
    return payload


def render(payload: Dict[str, Any]) -> str:
    cfg = payload["config"]
    mib = 2 ** 20
    headers = ["variant", "samples/s", "vs no-comm", "vs no-comm (paired)",
               "allreduce calls/step", "MiB/step",
               "bytes/step x tau / param bytes", "comm share", "waited ms/step", "stalls",
               "CPU ms/step", "main-thread CPU ms/step", "other-threads CPU ms/step",
               "cores/worker", "CPU-bound ratio"]
    rows = []
    for r in payload["variants"]:
        rows.append([r["name"], r["samples_per_sec"], r["ratio"], r["ratio_paired"],
                     r["allreduce_calls_per_step"],
                     r["bytes_per_step"] / mib,
                     r["bytes_fraction_of_params"] if r["kind"] != "local" else None,
                     r["comm_share"], r["wait_ms_per_step"], r["stalls"],
                     r["cpu_ms_per_step"], r["main_thread_cpu_ms_per_step"],
                     r["other_threads_cpu_ms_per_step"], r["cores_per_worker"],
                     r["cpu_bound_ratio"]])
    lines = [
        f"## throughput: model={cfg['model']} ({cfg['parameters']:,} parameters, "
        f"{cfg['param_bytes'] / mib:.1f} MiB), batch {cfg['batch']}/worker, "
        f"{cfg['world_size']} workers, device {cfg['device']}, compression {' '.join(cfg['compression'])}, "
        f"{cfg['reps']} reps" + (", polite wait (experiment)" if cfg["polite_wait"] else "")
        + ", Horovod " + " ".join(f"{k}={v}" for k, v in cfg["horovod_settings"].items()),
        "",
        format_table(headers, rows),
        "",
        "targets:",
    ]
    for t in payload["targets"]:
        status = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        lines.append(f"- [{status}] {t['target']}: {t['value']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
