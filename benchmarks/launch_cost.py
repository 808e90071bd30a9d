"""Where Horovod's fixed in-job cost comes from: the launcher, ``hvd.init()``, or the peers.

    .venv/bin/python benchmarks/launch_cost.py --reps 6 --json launch_cost.json

``baselines.py`` finds that training inside a Horovod job that never communicates runs a few
percent below two plain processes. This script takes that gap apart. Every variant runs the
same training loop (the heavy MLP, SGD with momentum, one thread, the batch ``baselines.py``
gives each rank) on ``--np`` processes at once, and nothing else:

- ``plain``: plain processes, no Horovod imported (the physical limit);
- ``horovodrun``: the same processes started by ``horovodrun --gloo``, Horovod never
  initialised (what the launcher costs: its environment, output forwarding, the middlemen);
- ``init-alone``: plain processes that each call ``hvd.init()`` alone (one rank each): Horovod's
  background thread, with no peer to talk to;
- ``init-job``: ``horovodrun --gloo`` and ``hvd.init()`` (a real job of ``--np`` ranks), the
  in-job "no-comm" of ``baselines.py``.

Repetitions are interleaved, their order rotating. Each variant's samples/s is the job's
(``np * batch * steps`` over the slowest rank's time); the table gives the median over
repetitions of its ratio to ``plain`` in the same repetition. ``HOROVOD_CYCLE_TIME`` is 20 ms
(hvd-easgd's setting) unless the environment sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import HEAVY_HIDDEN, format_table, job_env, write_json  # noqa: E402

VARIANTS = ("plain", "horovodrun", "init-alone", "init-job")
#: The variants ``horovodrun`` starts (one command for every rank); the others are N processes.
UNDER_HOROVODRUN = ("horovodrun", "init-job")


def worker(args: argparse.Namespace) -> None:
    """One rank: warm up, time ``--steps`` training steps, print one JSON line."""
    from benchmarks.common import (
        fresh_model, model_spec, setup_worker, synthetic_batch, train_step,
    )

    rank = int(os.environ.get("HOROVOD_RANK", args.rank))
    if args.init:
        import horovod.torch as hvd

        hvd.init()
    setup_worker(1)
    spec = model_spec("heavy", args.hidden)
    x, y = synthetic_batch(spec, args.batch, rank)
    model, opt = fresh_model(spec, 0.01)
    for _ in range(args.warmup):
        train_step(model, opt, x, y)
    if args.init and hvd.size() > 1:
        hvd.barrier()
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, opt, x, y)
    print("RESULT " + json.dumps({
        "rank": rank, "seconds": time.perf_counter() - started,
        "horovod_size": hvd.size() if args.init else None,
        "launched_by_horovodrun": "HOROVOD_RANK" in os.environ}), flush=True)


def command(variant: str, args: argparse.Namespace, rank: int = 0) -> List[str]:
    me = [args.python, str(Path(__file__).resolve()), "--role", "worker", "--rank", str(rank),
          "--hidden", str(args.hidden), "--batch", str(args.batch), "--steps", str(args.steps),
          "--warmup", str(args.warmup)]
    if variant.startswith("init"):
        me.append("--init")
    if variant in UNDER_HOROVODRUN:
        return [args.horovodrun, "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo",
                "--start-timeout", "120", *me]
    return me


def run_variant(variant: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The job's samples/s (every rank's batches over the slowest rank's time) and, per
    rank, how it ran (Horovod's size if initialised; whether horovodrun started it)."""
    env = job_env(1, {"HOROVOD_CYCLE_TIME": os.environ.get("HOROVOD_CYCLE_TIME", "20")})
    commands = ([command(variant, args)] if variant in UNDER_HOROVODRUN
                else [command(variant, args, r) for r in range(args.np)])
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
             for cmd in commands]
    ranks = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.job_timeout)
        if proc.returncode:
            raise RuntimeError(f"{variant}: exit code {proc.returncode}\n{out}")
        for line in out.splitlines():
            if "RESULT " in line:
                ranks.append(json.loads(line.split("RESULT ", 1)[1]))
    if len(ranks) != args.np:
        raise RuntimeError(f"{variant}: {len(ranks)} of {args.np} ranks reported")
    slowest = max(r["seconds"] for r in ranks)
    return {"samples_per_sec": args.np * args.batch * args.steps / slowest,
            "ranks": sorted(ranks, key=lambda r: r["rank"])}


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    runs: List[Dict[str, Dict[str, Any]]] = []
    for rep in range(args.reps):
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
        runs.append({v: run_variant(v, args) for v in order})
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{v} {runs[-1][v]['samples_per_sec']:.1f}" for v in VARIANTS), file=sys.stderr,
            flush=True)
    rows = []
    for v in VARIANTS:
        sps = [r[v]["samples_per_sec"] for r in runs]
        ratios = [r[v]["samples_per_sec"] / r["plain"]["samples_per_sec"] for r in runs]
        rows.append({"variant": v, "per_rep_samples_per_sec": sps,
                     "median_samples_per_sec": statistics.median(sps),
                     "per_rep_vs_plain": ratios, "median_vs_plain": statistics.median(ratios),
                     "ranks": runs[-1][v]["ranks"]})
    return {"benchmark": "launch_cost", "config": {k: v for k, v in vars(args).items()
                                                   if k not in ("role", "rank", "init")},
            "rows": rows}


def render(payload: Dict[str, Any]) -> str:
    reps = len(payload["rows"][0]["per_rep_samples_per_sec"])
    headers = ["variant", *(f"rep {i + 1}" for i in range(reps)), "median samples/s",
               "x plain (median)", "x plain per rep"]
    body = [[r["variant"], *r["per_rep_samples_per_sec"], r["median_samples_per_sec"],
             r["median_vs_plain"], " ".join(f"{x:.2f}" for x in r["per_rep_vs_plain"])]
            for r in payload["rows"]]
    c = payload["config"]
    return (f"launch cost: heavy MLP (hidden {c['hidden']}), batch {c['batch']}/rank, "
            f"{c['np']} ranks x 1 thread, {c['steps']} steps, {reps} interleaved reps\n\n"
            + format_table(headers, body))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--hidden", type=int, default=HEAVY_HIDDEN)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="smoke test: hidden 16, 4 steps, 1 rep")
    p.add_argument("--json", default=None)
    p.add_argument("--job-timeout", type=float, default=600)
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    p.add_argument("--horovodrun", default=str(Path(sys.executable).with_name("horovodrun")),
                   help=argparse.SUPPRESS)
    p.add_argument("--role", choices=("orchestrate", "worker"), default="orchestrate",
                   help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--init", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.batch, args.steps, args.warmup, args.reps = 16, 4, 4, 1, 1
    if min(args.np, args.batch, args.steps, args.reps) < 1:
        p.error("--np, --batch, --steps and --reps must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    args = parse_args(argv)
    if args.role == "worker":
        worker(args)
        return None
    payload = measure(args)
    print(render(payload))
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
