"""EASGD against what a PyTorch user would pick instead, and against the physical limit.

Run it as a plain program (it starts every job itself; do NOT run it under horovodrun)::

    python benchmarks/baselines.py --model heavy --reps 3 --json runs/bench/baselines.json
    python benchmarks/baselines.py --quick                  # tiny model, 1 rep: a smoke test

Every repetition launches, in an order rotated by one each repetition, the same model, batch,
threads and synthetic data (``benchmarks/common.py``) in four kinds of job:

1. ``plain``: N plain Python processes, **no Horovod in the process**, no communication at all,
   started together and timed over the same window: the physical limit of this machine;
2. ``torch`` (under ``torchrun --standalone --nproc-per-node N``, Gloo): ``torch-ddp``
   (``DistributedDataParallel``, gradient allreduce every step, overlapped with backward) and
   ``torch-averager-tauT``: local SGD with ``PeriodicModelAverager(period=T)`` (what
   ``PostLocalSGDOptimizer`` does after its warm-up: one parameter allreduce every T steps);
3. ``hvd-default`` (``benchmarks/throughput.py`` under ``horovodrun --gloo``, Horovod's own
   runtime defaults): ``hvd-sgd`` (``hvd.DistributedOptimizer``) and the in-job ``no-comm``;
4. ``hvd-easgd`` (the same, with hvd-easgd's Horovod settings, ``hvd_easgd/optim/tuning.py``, as the
   trainer and the launchers apply them): ``easgd-sync-tauT``, ``easgd-async-tauT`` and the
   in-job ``no-comm``.

With ``--cycle-times MS...`` it adds, per value, a Horovod job with ``HOROVOD_CYCLE_TIME=MS``
running ``--cycle-variants`` (rows ``NAME@cycleMSms``): the measured effect of that setting.

The in-job ``no-comm`` rows (``hvd-nocomm@...``) train without communicating inside a Horovod
job; they are diagnostics of what Horovod's presence alone costs, not the reference.

Reported per row: samples/s of each repetition, their median, the median over repetitions of
the ratio to the physical limit of the same repetition, and the same against torch's averager
(at the row's tau; at ``--target-tau`` for rows without one). Markdown on stdout, everything
in ``--json``. The 1-minute load average before every job is printed and recorded, so a
shared machine's noise is visible. Targets (issue 11) are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `hvd_easgd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()

#: Issue 11's targets (heavy model, 2 workers, tau = 16).
SYNC_TARGET = 0.95
ASYNC_TARGET = 0.97

LIMIT = "plain-nocomm"
#: Windows shorter than this (s) get no estimate of other processes' CPU (10 ms clock ticks).
MIN_WINDOW = 1.0

ROW_INFO = {
    "plain": "N plain processes, no Horovod, no communication: the physical limit",
    "torch-ddp": "torch DistributedDataParallel (gradient allreduce every step)",
    "torch-averager": "torch PeriodicModelAverager(period=tau): local SGD, parameter allreduce "
                      "every tau steps",
    "hvd-sgd": "hvd.DistributedOptimizer (gradient allreduce every step)",
    "easgd-synclate": "hvd_easgd EASGD, sync, every round started at its own step "
                      "(start_early=False)",
    "easgd-sync": "hvd_easgd EASGD, sync",
    "easgd-async": "hvd_easgd EASGD, async",
    "hvd-nocomm": "diagnostic: no communication inside a Horovod job",
}


# =============================================================================== workers
# Shared by the plain and torch workers; neither imports Horovod.


def _worker_setup(args: argparse.Namespace):
    import torch

    from benchmarks.common import model_spec, setup_worker

    setup_worker(args.threads)
    spec = model_spec(args.model, args.hidden)
    return torch, spec


def plain_worker(args: argparse.Namespace) -> None:
    """One process of the physical limit: warm up, say READY, wait for GO, time the window."""
    torch, spec = _worker_setup(args)
    from benchmarks.common import fresh_model, synthetic_batch, timed_window, train_step

    x, y = synthetic_batch(spec, args.batch, args.rank)
    model, opt = fresh_model(spec, args.lr)
    for _ in range(args.warmup):
        train_step(model, opt, x, y)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        raise SystemExit("plain worker: expected GO on stdin")
    window = timed_window(lambda: train_step(model, opt, x, y), args.steps)
    result = {"rank": args.rank, "steps": args.steps, "seconds": window.seconds,
              "cpu_seconds": window.cpu_seconds,
              "machine_busy_seconds": window.machine_busy_seconds,
              "horovod_imported": any(m == "horovod" or m.startswith("horovod.")
                                      for m in sys.modules),
              "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(result), flush=True)


def count_all_reduce(patches, counts: Dict[str, int]) -> None:
    """Count the calls and bytes handed to ``torch.distributed.all_reduce`` (what torch's
    averager calls) into ``counts``, from outside the averager."""
    import torch.distributed as dist

    def make(original):
        def counted(tensor, *a, **k):
            counts["calls"] += 1
            counts["bytes"] += tensor.numel() * tensor.element_size()
            return original(tensor, *a, **k)
        return counted

    patches.wrap(dist, "all_reduce", make)


def torch_worker(args: argparse.Namespace) -> None:
    """Under torchrun: every torch variant in ``--variants`` (rotated), rank 0 writes JSON."""
    torch, spec = _worker_setup(args)
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks.common import Patches, fresh_model, synthetic_batch, timed_window

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    x, y = synthetic_batch(spec, args.batch, rank)
    names = list(args.variants)
    shift = args.rotate % len(names)
    results: Dict[str, Any] = {}
    for name in names[shift:] + names[:shift]:
        tau = _tau_of(name) if name.startswith("torch-averager") else None
        model, _ = fresh_model(spec, args.lr)
        for p in model.parameters():  # identical already (same seed); as a user would
            dist.broadcast(p.data, 0)
        averager = None
        if name == "torch-ddp":
            net = DDP(model)
            opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
        elif tau is not None:
            net = model
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
            averager = PeriodicModelAverager(period=tau, warmup_steps=0)
        else:
            raise SystemExit(f"unknown torch variant {name!r}")

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            if averager is not None:
                averager.average_parameters(model.parameters())

        period = tau or 1
        warmup = math.ceil(max(args.warmup, 1 if tau else 0) / period) * period
        window = math.ceil(args.steps / period) * period
        for _ in range(warmup):
            step()
        dist.barrier()
        patches, counts = Patches(), {"calls": 0, "bytes": 0}
        count_all_reduce(patches, counts)
        try:
            timed = timed_window(step, window)
        finally:
            patches.close()
        elapsed, cpu = timed.seconds, timed.cpu_seconds
        busy = timed.machine_busy_seconds if timed.machine_busy_seconds is not None else math.nan
        stats = torch.tensor([elapsed, cpu], dtype=torch.float64)
        slowest = stats.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        results[name] = {
            "steps": window, "seconds": float(slowest[0]),
            # other processes' CPU meanwhile: the machine's busy time (rank 0) minus ours
            "foreign_cores": (max(0.0, busy - float(stats[1])) / float(slowest[0])
                              if float(slowest[0]) >= MIN_WINDOW else float("nan")),
            "cpu_seconds": float(stats[1]) / size, "allreduce_calls": counts["calls"],
            # DDP's reducer calls the process group from C++: its bytes are not counted here.
            "bytes": counts["bytes"] if averager is not None else None,
            "samples_per_sec": size * args.batch * window / float(slowest[0]),
        }
        del net, opt, model, averager
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": size, "variants": results}))
    dist.barrier()
    dist.destroy_process_group()


def _tau_of(name: str) -> Optional[int]:
    """``easgd-sync-tau16`` -> 16 (also ``...-tau16@cycle5ms``); None without a tau."""
    base = name.split("@", 1)[0]
    if "-tau" not in base:
        return None
    return int(base.rsplit("-tau", 1)[1])


# =============================================================================== orchestrator


class JobFailed(RuntimeError):
    pass


def _env(args: argparse.Namespace, extra: Optional[Dict[str, Optional[str]]] = None
         ) -> Dict[str, str]:
    from benchmarks.common import job_env

    return job_env(args.threads, extra)


def _model_args(args: argparse.Namespace) -> List[str]:
    return ["--model", args.model, "--hidden", str(args.hidden), "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--lr", str(args.lr)]


def _run(cmd: Sequence[str], env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise JobFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout ---\n"
                        f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def run_plain(args: argparse.Namespace, rotate: int = 0, subset: Optional[Sequence[str]] = None
              ) -> Tuple[Dict[str, Dict[str, Any]], None]:
    """N plain processes started together; samples/s over the slowest one's window."""
    cmd = [args.python, str(SCRIPT), "--role", "plain", *_model_args(args)]
    env = _env(args)
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], cwd=str(REPO), env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(args.np)]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "READY":
                raise JobFailed(f"plain worker did not start: {line!r}\n{proc.stderr.read()}")
        for proc in procs:  # all warmed up: start the timed windows together
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=args.job_timeout)
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise JobFailed(f"plain worker exited {proc.returncode}\n{err[-4000:]}")
            results.append(json.loads(lines[-1][len("RESULT "):]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if any(r["horovod_imported"] for r in results):
        raise JobFailed("a plain worker imported Horovod")
    slowest = max(r["seconds"] for r in results)
    steps = results[0]["steps"]
    busy = results[0]["machine_busy_seconds"]
    foreign = (max(0.0, busy - sum(r["cpu_seconds"] for r in results)) / results[0]["seconds"]
               if busy is not None and results[0]["seconds"] >= MIN_WINDOW else float("nan"))
    return {LIMIT: {"steps": steps, "seconds": slowest,
                    "samples_per_sec": args.np * args.batch * steps / slowest,
                    "bytes_per_step": 0, "allreduce_calls_per_step": 0,
                    "cpu_ms_per_step": 1000 * statistics.mean(r["cpu_seconds"] for r in results)
                    / steps, "foreign_cores": foreign,
                    "per_worker_seconds": [r["seconds"] for r in results]}}, None


def torch_variants(args: argparse.Namespace) -> List[str]:
    return ["torch-ddp", *(f"torch-averager-tau{t}" for t in args.taus)]


def run_torch(args: argparse.Namespace, rotate: int, subset: Optional[Sequence[str]] = None
              ) -> Tuple[Dict[str, Dict[str, Any]], None]:
    with tempfile.TemporaryDirectory(prefix="baselines-torch-") as tmp:
        out = Path(tmp) / "torch.json"
        cmd = [args.python, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(args.np), str(SCRIPT), "--role", "torch",
               *_model_args(args), "--variants", *(subset or torch_variants(args)),
               "--rotate", str(rotate), "--out", str(out)]
        _run(cmd, _env(args), args.job_timeout)
        payload = json.loads(out.read_text())
    rows = {}
    for name, r in payload["variants"].items():
        tau = _tau_of(name)
        rows[name] = {"steps": r["steps"], "seconds": r["seconds"],
                      "samples_per_sec": r["samples_per_sec"],
                      "bytes_per_step": (r["bytes"] / r["steps"]) if r["bytes"] is not None
                      else None,
                      "bytes_exact": (r["bytes"] * tau == args.param_bytes * r["steps"])
                      if tau and r["bytes"] is not None else None,
                      "allreduce_calls_per_step": r["allreduce_calls"] / r["steps"],
                      "cpu_ms_per_step": 1000 * r["cpu_seconds"] / r["steps"],
                      "foreign_cores": r["foreign_cores"]}
    return rows, None


def run_horovod(args: argparse.Namespace, only: Sequence[str], suffix: str, rename_all: bool,
                extra_env: Dict[str, Optional[str]], defaults: bool, rotate: int
                ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """benchmarks/throughput.py under horovodrun.

    Its in-job ``no-comm`` becomes ``hvd-nocomm@SUFFIX``; with ``rename_all`` every row gets
    the ``@SUFFIX`` (the cycle-time jobs). Returns the rows and Horovod's effective settings.
    """
    with tempfile.TemporaryDirectory(prefix="baselines-hvd-") as tmp:
        out = Path(tmp) / "throughput.json"
        cmd = [args.horovodrun, "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo",
               "--start-timeout", "120", args.python, str(REPO / "benchmarks" / "throughput.py"),
               *_model_args(args), "--reps", "1", "--rotate", str(rotate),
               "--taus", *map(str, args.taus), "--only", *only, "--json", str(out)]
        if defaults:
            cmd.append("--horovod-defaults")
        _run(cmd, _env(args, extra_env), args.job_timeout)
        payload = json.loads(out.read_text())
    rows = {}
    for v in payload["variants"]:
        name = hvd_row_name(v["name"], suffix, rename_all)
        # Strictly issue 11's definition: the bytes of one round (tau steps; one step for
        # hvd-sgd) are exactly the parameter bytes, nothing added.
        per = (v["tau"] or 1) if v["kind"] == "elastic" else 1
        extra = (v["total_bytes"] * per - args.param_bytes * v["total_steps"]) / v["total_steps"]
        rows[name] = {
            "steps": v["total_steps"], "seconds": v["total_steps"] * args.np * args.batch
            / v["samples_per_sec"], "samples_per_sec": v["samples_per_sec"],
            "bytes_per_step": v["bytes_per_step"],
            "bytes_exact": (extra == 0) if v["kind"] != "local" else None,
            "extra_bytes_per_round": extra if v["kind"] != "local" else None,
            "throughput_bytes_exact": v.get("bytes_exact"),
            "allreduce_calls_per_step": v["allreduce_calls_per_step"],
            "cpu_ms_per_step": v["cpu_ms_per_step"], "comm_share": v["comm_share"],
            "wait_ms_per_step": v["wait_ms_per_step"], "stalls": v["stalls"],
            "cores_per_worker": v["cores_per_worker"],
            "foreign_cores": (v.get("foreign_cores", float("nan"))
                              if v["total_steps"] * args.np * args.batch / v["samples_per_sec"]
                              >= MIN_WINDOW else float("nan")),
        }
    return rows, payload["config"].get("horovod_settings", {})


def hvd_row_name(variant: str, suffix: str, rename_all: bool) -> str:
    """throughput.py's variant name -> this table's row name (and back: :func:`hvd_variant`)."""
    name = "hvd-nocomm" if variant == "no-comm" else variant
    return f"{name}@{suffix}" if (name == "hvd-nocomm" or rename_all) else name


def hvd_variant(row: str) -> str:
    base = row.split("@", 1)[0]
    return "no-comm" if base == "hvd-nocomm" else base


def jobs(args: argparse.Namespace) -> List[Tuple[str, Any]]:
    """(name, run(rotate, subset) -> (rows, Horovod settings)) for every job of a repetition.

    ``subset`` (row names) restricts a job to some of its rows, to measure them again.
    """
    out: List[Tuple[str, Any]] = []
    easgd = [f"easgd-{m}-tau{t}" for m in ("sync", "async") for t in args.taus]
    clean = {k: None for k in args.tuned_vars}  # the user's shell must not leak into a job

    def hvd_job(variants, suffix, rename_all, env, defaults):
        def run(rot, subset=None):
            only = variants if subset is None else sorted({hvd_variant(r) for r in subset})
            return run_horovod(args, only, suffix, rename_all, env, defaults, rot)
        return run

    if "plain" in args.groups:
        out.append(("plain", lambda rot, subset=None: run_plain(args, rot)))
    if "torch" in args.groups:
        out.append(("torch", lambda rot, subset=None: run_torch(args, rot, subset)))
    if "hvd" in args.groups:
        out.append(("hvd-default", hvd_job(["hvd-sgd"], "default", False,
                                           {**clean, "HVD_EASGD_TUNE": "0"}, True)))
        out.append(("hvd-easgd", hvd_job(easgd, "tuned", False, dict(clean), False)))
    for ms in args.cycle_times:
        tag = f"cycle{ms:g}ms"
        env = {**clean, "HVD_EASGD_TUNE": "0", "HOROVOD_CYCLE_TIME": f"{ms:g}"}
        out.append((f"hvd-{tag}", hvd_job(list(args.cycle_variants), tag, True, env, True)))
    return out


def _cpu_ticks() -> Tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0, 0
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def busy_cores(seconds: float = 1.0) -> float:
    """Cores the machine kept busy over the next ``seconds`` (this process idle meanwhile)."""
    b0, _ = _cpu_ticks()
    time.sleep(seconds)
    b1, _ = _cpu_ticks()
    return (b1 - b0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_until_idle(limit_cores: float, max_wait: float, quiet_for: float = 10.0
                    ) -> Tuple[float, float]:
    """Wait (at most ``max_wait`` s) until other processes have used < ``limit_cores`` cores
    for ``quiet_for`` seconds in a row (a gap between two jobs of a test suite is not enough).

    Returns (busy cores over the last quiet period, seconds waited).
    """
    started = time.time()
    while True:
        busy = busy_cores(quiet_for)
        if busy < limit_cores or time.time() - started >= max_wait:
            return busy, time.time() - started
        time.sleep(2.0)


def _run_job(args: argparse.Namespace, rep: int, name: str, job: Any,
             settings: Dict[str, Dict[str, str]], failures: List[str],
             subset: Optional[Sequence[str]] = None
             ) -> Tuple[Dict[str, Any], Optional[Dict[str, Dict[str, Any]]]]:
    """Run one job once: wait for an idle machine if asked, time it, count others' CPU."""
    waited = 0.0
    if args.wait_idle > 0:
        _, waited = wait_until_idle(args.idle_cores, args.wait_idle, args.quiet_for)
    load = os.getloadavg()
    started = time.time()
    ticks0, mine0 = _cpu_ticks()[0], _children_cpu()
    entry: Dict[str, Any] = {"rep": rep + 1, "job": name, "load_1min": load[0],
                             "load_5min": load[1], "waited_for_idle_seconds": waited,
                             "subset": list(subset) if subset else None,
                             "started_utc": time.strftime("%H:%M:%S", time.gmtime(started))}
    got: Optional[Dict[str, Dict[str, Any]]] = None
    try:
        got, hsettings = job(rep, subset)
        if hsettings is not None:
            settings[name] = hsettings
        entry["ok"] = True
    except (JobFailed, subprocess.TimeoutExpired) as exc:
        entry["ok"] = False
        failures.append(f"rep {rep + 1} {name}: {exc}")
    entry["seconds"] = time.time() - started
    # Other processes' CPU during the whole job (start-up included): the machine's busy time
    # minus this job's (its processes are all waited-for descendants of this one), in cores.
    busy = (_cpu_ticks()[0] - ticks0) / os.sysconf("SC_CLK_TCK")
    entry["foreign_cores"] = max(0.0, busy - (_children_cpu() - mine0)) / max(
        entry["seconds"], 1e-9)
    entry["rows_foreign_cores"] = {k: v.get("foreign_cores") for k, v in (got or {}).items()}
    _say(f"rep {rep + 1}/{args.reps} {name:>14}: load {load[0]:.2f} before"
         + (f" (waited {waited:.0f} s for idle)" if waited >= 1 else "")
         + f", {entry['seconds']:5.1f} s, other processes used "
         f"{entry['foreign_cores']:.2f} cores meanwhile"
         + ("" if entry["ok"] else "  FAILED") + "".join(
             f"\n    {k:>34}: {v['samples_per_sec']:8.1f} samples/s"
             f" (others: {v.get('foreign_cores', float('nan')):.2f} cores)"
             for k, v in (got or {}).items()))
    return entry, got


def _disturbed(args: argparse.Namespace, row: Dict[str, Any]) -> bool:
    f = row.get("foreign_cores")
    return (args.max_foreign is not None and f is not None and f == f
            and f > args.max_foreign)


def measure_all(args: argparse.Namespace) -> Dict[str, Any]:
    """Run every job of every repetition; attach to each row the physical limit it is paired with.

    Without bracketing, a repetition runs each job once (rotated) and every row of the
    repetition is compared with its one ``plain`` run. With ``--bracket`` (the default) the
    ``plain`` job also runs before the first job, between every two jobs and after the last,
    and each job's rows are compared with the mean of the two ``plain`` runs around that job,
    so load that drifts during a repetition (another job on the machine) cancels in the ratio.

    With ``--max-foreign C``, a row whose timed window saw other processes use more than ``C``
    cores is measured again (its job restricted to the disturbed rows, after waiting for an
    idle machine), at most ``--retries`` times; the last measurement is kept and flagged.
    """
    job_list = jobs(args)
    plain = next((job for name, job in job_list if name == "plain"), None)
    others = [(name, job) for name, job in job_list if name != "plain"]
    per_rep: List[Dict[str, Dict[str, Any]]] = []
    log: List[Dict[str, Any]] = []
    settings: Dict[str, Dict[str, str]] = {}
    failures: List[str] = []
    for rep in range(args.reps):
        if args.bracket and plain is not None:
            shift = rep % max(1, len(others))
            rotated = others[shift:] + others[:shift]
            sequence = [("plain", plain)]
            for item in rotated:
                sequence += [item, ("plain", plain)]
        else:
            shift = rep % len(job_list)
            sequence = job_list[shift:] + job_list[:shift]
        results: List[Tuple[str, Optional[Dict[str, Dict[str, Any]]]]] = []
        for name, job in sequence:
            entry, got = _run_job(args, rep, name, job, settings, failures)
            entry["attempt"] = 1
            log.append(entry)
            for attempt in range(2, 2 + max(0, args.retries)):
                disturbed = sorted(k for k, v in (got or {}).items() if _disturbed(args, v))
                if not disturbed:
                    break
                _say(f"    disturbed (other processes > {args.max_foreign:g} cores): "
                     f"{', '.join(disturbed)}: measuring again")
                entry, again = _run_job(args, rep, name, job, settings, failures,
                                        subset=None if name == "plain" else disturbed)
                entry["attempt"] = attempt
                log.append(entry)
                for k, v in (again or {}).items():
                    if got is None or k in disturbed or k not in got:
                        got = got if got is not None else {}
                        got[k] = dict(v, attempts=attempt)
            for k, v in (got or {}).items():
                v["disturbed"] = _disturbed(args, v)
            results.append((name, got))
        per_rep.append(pair_with_limit(results))
    return {"per_rep": per_rep, "jobs": log, "horovod_settings": settings, "failures": failures}


def pair_with_limit(results: Sequence[Tuple[str, Optional[Dict[str, Dict[str, Any]]]]]
                    ) -> Dict[str, Dict[str, Any]]:
    """One repetition's rows, each with ``limit_ref``: the physical limit it is compared with.

    ``results`` is the repetition's jobs in the order they ran (``None`` for a failed job).
    A job's rows get the mean of the nearest successful ``plain`` run before it and the nearest
    after it (just one of them if only one exists). The ``plain-nocomm`` row of the repetition
    is the median of its runs, and is its own reference.
    """
    limits = [(i, got[LIMIT]["samples_per_sec"]) for i, (name, got) in enumerate(results)
              if name == "plain" and got]
    rows: Dict[str, Dict[str, Any]] = {}
    if limits:
        values = [v for _, v in limits]
        first = next(got for name, got in results if name == "plain" and got)[LIMIT]
        rows[LIMIT] = dict(first, samples_per_sec=statistics.median(values),
                           runs_samples_per_sec=values)
        rows[LIMIT]["limit_ref"] = rows[LIMIT]["samples_per_sec"]
    for i, (name, got) in enumerate(results):
        if name == "plain" or not got:
            continue
        before = [v for j, v in limits if j < i][-1:]
        after = [v for j, v in limits if j > i][:1]
        around = before + after
        ref = statistics.mean(around) if around else None
        for key, row in got.items():
            rows[key] = dict(row, limit_ref=ref)
    return rows


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(args: argparse.Namespace, measured: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per variant: per-repetition numbers, medians, paired ratios."""
    per_rep = measured["per_rep"]
    names: List[str] = []
    for rows in per_rep:
        names += [n for n in rows if n not in names]
    order = {n: i for i, n in enumerate(_display_order(args))}
    names.sort(key=lambda n: (order.get(n.split("@")[0], 99), _suffix_key(n)))
    target_tau = args.target_tau
    out = []
    for name in names:
        tau = _tau_of(name)
        ref_avg = f"torch-averager-tau{tau if tau in args.taus else target_tau}"
        sps = [rows.get(name, {}).get("samples_per_sec") for rows in per_rep]
        limit = [rows.get(name, {}).get("limit_ref") for rows in per_rep]
        avg = [rows.get(ref_avg, {}).get("samples_per_sec") for rows in per_rep]
        avg_limit = [rows.get(ref_avg, {}).get("limit_ref") for rows in per_rep]
        vs_limit = [s / l if s and l else None for s, l in zip(sps, limit)]
        # Against torch's averager: the ratio of the two rows' ratios to their own physical-limit
        # references (drift between the two jobs cancels); the raw ratio is kept too.
        vs_avg = [(s / l) / (a / al) if s and l and a and al else None
                  for s, l, a, al in zip(sps, limit, avg, avg_limit)]
        vs_avg_raw = [s / a if s and a else None for s, a in zip(sps, avg)]
        info = next((rows[name] for rows in per_rep if name in rows), {})
        base = name.split("@")[0]
        kind = ("limit" if name == LIMIT else "torch" if base.startswith("torch") else
                "diagnostic" if base == "hvd-nocomm" else "horovod")
        exact = [rows[name].get("bytes_exact") for rows in per_rep if name in rows]
        out.append({
            "name": name, "kind": kind, "tau": tau,
            "what": next((v for k, v in ROW_INFO.items() if base.startswith(k)), ""),
            "per_rep_samples_per_sec": sps,
            "median_samples_per_sec": _median(sps),
            "per_rep_limit_reference": limit,
            "per_rep_foreign_cores": [rows.get(name, {}).get("foreign_cores") for rows in per_rep],
            "per_rep_disturbed": [rows.get(name, {}).get("disturbed") for rows in per_rep],
            "per_rep_vs_limit": vs_limit, "median_vs_limit": _median(vs_limit),
            "averager_reference": ref_avg if any(avg) else None,
            "per_rep_vs_averager": vs_avg, "median_vs_averager": _median(vs_avg),
            "per_rep_vs_averager_raw": vs_avg_raw,
            "bytes_per_step": info.get("bytes_per_step"),
            "bytes_exact": (all(exact) if exact and None not in exact else None),
            "allreduce_calls_per_step": info.get("allreduce_calls_per_step"),
            "per_rep": [rows.get(name) for rows in per_rep],
        })
    return out


def _suffix_key(name: str) -> Tuple[int, float, str]:
    """Rows of one variant: no suffix, @default, @tuned, then @cycleXms by X."""
    suffix = name.split("@", 1)[1] if "@" in name else ""
    if suffix.startswith("cycle") and suffix.endswith("ms"):
        try:
            return (2, float(suffix[5:-2]), suffix)
        except ValueError:
            pass
    return (0 if suffix in ("", "default") else 1, 0.0, suffix)


def _display_order(args: argparse.Namespace) -> List[str]:
    return [LIMIT, "torch-ddp", *(f"torch-averager-tau{t}" for t in args.taus), "hvd-sgd",
            *(f"easgd-{m}-tau{t}" for m in ("sync", "async") for t in args.taus), "hvd-nocomm"]


def check_targets(args: argparse.Namespace, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by = {r["name"]: r for r in rows}
    t = args.target_tau
    targets = []
    easgd = [r for r in rows if r["name"].startswith("easgd-")]
    extras = sorted({x["extra_bytes_per_round"] for r in easgd for x in r["per_rep"]
                     if x and x.get("extra_bytes_per_round") is not None})
    targets.append({
        "target": "bytes/step = parameter bytes / tau exactly, every EASGD row",
        "value": ", ".join(f"{r['name']}: {r['bytes_per_step'] * (r['tau'] or 1) / args.param_bytes:.6g}"
                           for r in easgd if r["bytes_per_step"] is not None)
        + (f" (bytes beyond the parameters per round: {', '.join(f'{e:g}' for e in extras)})"
           if any(extras) else ""),
        "met": all(r["bytes_exact"] for r in easgd) if easgd else None})
    for mode, floor in (("sync", SYNC_TARGET), ("async", ASYNC_TARGET)):
        row = by.get(f"easgd-{mode}-tau{t}")
        if row is None:
            continue
        v = row["median_vs_limit"]
        targets.append({"target": f"easgd-{mode}-tau{t} >= {floor:.2f} x physical limit "
                                  "(median of per-repetition ratios)",
                        "value": _ratios(v, row["per_rep_vs_limit"]),
                        "met": None if v is None else v >= floor})
        a = row["median_vs_averager"]
        targets.append({"target": f"easgd-{mode}-tau{t} >= torch-averager-tau{t} "
                                  "(median of per-repetition ratios >= 1)",
                        "value": _ratios(a, row["per_rep_vs_averager"]),
                        "met": None if a is None else a >= 1.0})
    return targets


def _ratios(median: Optional[float], per_rep: Sequence[Optional[float]]) -> str:
    if median is None:
        return "not measured"
    return f"{median:.3f} (per repetition: " + ", ".join(
        "-" if r is None else f"{r:.3f}" for r in per_rep) + ")"


def render(payload: Dict[str, Any]) -> str:
    cfg = payload["config"]
    reps = cfg["reps"]
    mib = 2 ** 20
    headers = (["variant"] + [f"rep {i + 1}" for i in range(reps)]
               + ["median samples/s", "x limit", "x limit per rep", "x torch averager",
                  "MiB/step", "others' cores (max)"])
    table = []
    for r in payload["rows"]:
        table.append([r["name"], *r["per_rep_samples_per_sec"], r["median_samples_per_sec"],
                      r["median_vs_limit"],
                      " ".join("-" if v is None else f"{v:.2f}" for v in r["per_rep_vs_limit"]),
                      None if r["averager_reference"] is None else r["median_vs_averager"],
                      None if r["bytes_per_step"] is None else r["bytes_per_step"] / mib,
                      max((f for f in r["per_rep_foreign_cores"] if f is not None and f == f),
                          default=None)])
    from benchmarks.common import format_table

    lines = [
        f"## baselines: model {cfg['model']} ({cfg['parameters']:,} parameters, "
        f"{cfg['param_bytes'] / mib:.1f} MiB), batch {cfg['batch']}/worker, {cfg['np']} workers "
        f"x {cfg['threads']} thread(s), {reps} interleaved reps, {cfg['environment']['date_utc']}"
        " UTC", "",
        "samples/s per repetition and median; `x limit`: median over repetitions of the ratio to "
        f"`{LIMIT}` " + ("measured around the same job (mean of the runs just before and after "
                         "it)" if cfg["bracket"] else "of the same repetition")
        + "; `x torch averager`: median over repetitions of (the row's `x limit`) / "
        f"(`torch-averager-tauT`'s `x limit`) at the row's tau (tau {cfg['target_tau']} for rows "
        "without one).",
        "", format_table(headers, table), "",
        "Horovod settings per job: " + "; ".join(
            f"{job}: " + " ".join(f"{k}={v}" for k, v in s.items())
            for job, s in payload["horovod_settings"].items()), "",
        "Load before each job (1-min load average) / cores used by other processes during it: "
        + "; ".join(f"rep {j['rep']} {j['job']} {j['load_1min']:.2f} / {j['foreign_cores']:.2f}"
                    + ("" if j["ok"] else " FAILED")
                    + (f" (disturbed, attempt {j['attempt']})" if j.get("disturbed") else "")
                    for j in payload["jobs"]), "",
        "targets (issue 11; set for --model heavy, 2 workers, tau 16):"]
    for t in payload["targets"]:
        status = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        lines.append(f"- [{status}] {t['target']}: {t['value']}")
    if payload["failures"]:
        lines += ["", "FAILED jobs:"] + [f"- {f.splitlines()[0]}" for f in payload["failures"]]
    return "\n".join(lines)


# =============================================================================== CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("cifar", "heavy"), default="heavy")
    p.add_argument("--hidden", type=int, default=4096, help="width of the heavy MLP")
    p.add_argument("--batch", type=int, default=None,
                   help="per-worker batch (default: the model's, 32 for heavy)")
    p.add_argument("--np", type=int, default=2, help="workers per job")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--steps", type=int, default=48,
                   help="timed steps per measurement (rounded up to whole rounds of each tau)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (whole rounds for periodic variants)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--taus", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--target-tau", type=int, default=16,
                   help="tau of the targets and of the averager that rows without tau compare to")
    p.add_argument("--groups", nargs="+", default=["plain", "torch", "hvd"],
                   choices=("plain", "torch", "hvd"),
                   help="which jobs to run (hvd = hvd-default + hvd-easgd)")
    p.add_argument("--cycle-times", type=float, nargs="*", default=[], metavar="MS",
                   help="also run --cycle-variants with HOROVOD_CYCLE_TIME=MS, one job per value")
    p.add_argument("--cycle-variants", nargs="+", default=None,
                   help="throughput.py variants of the cycle-time jobs "
                        "(default: hvd-sgd easgd-sync-tauT easgd-async-tauT, T = --target-tau)")
    p.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                   help="run the physical limit before, between and after the other jobs of "
                        "every repetition and compare each job with the two runs around it")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each job, wait up to this long until other processes use fewer "
                        "than --idle-cores cores (a shared machine)")
    p.add_argument("--idle-cores", type=float, default=0.3)
    p.add_argument("--quiet-for", type=float, default=10.0, metavar="SECONDS",
                   help="with --wait-idle: how long the machine must stay idle before a job")
    p.add_argument("--max-foreign", type=float, default=None, metavar="CORES",
                   help="measure a job again (after waiting for idle) when other processes used "
                        "more than this many cores during it")
    p.add_argument("--retries", type=int, default=2, help="with --max-foreign: at most this "
                   "many extra attempts per job (the last one is kept, flagged)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny MLP (hidden 16), batch 4, 4 steps, 1 rep, taus 2 4")
    p.add_argument("--job-timeout", type=float, default=1200, help="seconds per job")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    # worker roles (internal)
    p.add_argument("--role", choices=("orchestrate", "plain", "torch"), default="orchestrate",
                   help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", default=[], help=argparse.SUPPRESS)
    p.add_argument("--rotate", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = dict(hidden=16, batch=4, steps=4, warmup=1, reps=1, taus=[2, 4], target_tau=4,
                 bracket=False) if args.quick else {}
    if args.quick and args.model != "heavy":
        p.error("--quick uses the heavy MLP (shrunk)")
    args = argparse.Namespace(**{**vars(args), **quick})
    t = args.target_tau
    args = argparse.Namespace(**{**vars(args), **{
        "batch": args.batch or (128 if args.model == "cifar" else 32),
        "cycle_variants": args.cycle_variants or ["hvd-sgd", f"easgd-sync-tau{t}",
                                                  f"easgd-async-tau{t}"]}})
    if min(args.np, args.threads, args.steps, args.reps) < 1 or args.warmup < 0:
        p.error("--np, --threads, --steps, --reps must be >= 1 and --warmup >= 0")
    if any(t < 1 for t in args.taus):
        p.error("every tau must be >= 1")
    return args


def with_job_facts(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments plus what every job needs to know: the model's size, the launcher, the
    Horovod variables a user's shell must not leak into a job."""
    from benchmarks.common import model_spec, param_bytes
    from hvd_easgd.optim import HOROVOD_SETTINGS

    hvdrun = Path(args.python).with_name("horovodrun")
    model = model_spec(args.model, args.hidden).build()
    return argparse.Namespace(
        **vars(args), tuned_vars=list(HOROVOD_SETTINGS),
        horovodrun=str(hvdrun) if hvdrun.exists() else (shutil.which("horovodrun")
                                                        or "horovodrun"),
        parameters=sum(p.numel() for p in model.parameters()), param_bytes=param_bytes(model))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.role == "plain":
        plain_worker(args)
        return {}
    if args.role == "torch":
        torch_worker(args)
        return {}
    if os.environ.get("HOROVOD_RANK") is not None:
        raise SystemExit("run baselines.py as a plain program: it starts horovodrun itself")
    from benchmarks.common import environment

    args = with_job_facts(args)
    _say(f"model {args.model}: {args.parameters:,} parameters, batch {args.batch}/worker, "
         f"{args.np} workers x {args.threads} thread(s), {args.reps} reps, taus {args.taus}")
    started = time.time()
    measured = measure_all(args)
    rows = summarise(args, measured)
    payload = {
        "benchmark": "baselines",
        "command": " ".join([Path(sys.argv[0]).name if sys.argv else "baselines.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "config": {**{k: v for k, v in vars(args).items()
                      if k not in ("role", "rank", "variants", "rotate", "out", "python")},
                   "environment": environment()},
        "rows": rows,
        "jobs": measured["jobs"],
        "horovod_settings": measured["horovod_settings"],
        "failures": measured["failures"],
        "wall_seconds": time.time() - started,
    }
    payload = dict(payload, targets=check_targets(args, rows))
    print(render(payload), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2))
    if measured["failures"]:
        for f in measured["failures"]:
            _say("FAILED " + f)
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
