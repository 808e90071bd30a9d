"""Profile one EASGD worker with py-spy and say what bounds it.

One command::

    python benchmarks/profile_round.py                      # both variants, heavy model
    python benchmarks/profile_round.py --variants easgd-sync-tau16 --duration 20 --json out.json
    python benchmarks/profile_round.py --analyze run.raw    # classify a py-spy raw file only

For each variant it starts ``horovodrun -np 2 -H localhost:2 --gloo`` running
``benchmarks/throughput.py --only VARIANT`` (the variant's window first, with more steps than the
profile needs), waits until the job is past its warm-up, attaches
``py-spy record --threads --idle --native --format raw`` to the rank-0 worker for ``--duration``
seconds, then stops the job. Every sample is classified per thread:

- the training thread (``MainThread``): forward, backward, the local optimizer step, zero_grad,
  and the round's pieces (snapshot, seal, finiteness check, the rule, the pull, starting the
  allreduce, waiting for it), plus the benchmark's own setup and instrumentation;
- the exchange thread (async mode, ``hvd-easgd-exchange``): sleeping between polls, polling,
  Horovod calls (``synchronize``/decompress);
- any other Python thread by its innermost function.

py-spy samples Python threads; with ``--native`` it shows Horovod's C++ background thread only
now and then, and Gloo's threads not at all. So the CPU time of every thread is also read from
``/proc`` over the same window: the rank-0 worker's training thread, its Python helper threads,
its native threads (Horovod's loop, Gloo), its peer worker, and the rest of the machine, in
cores. With ``--idle`` a sample is taken whether the thread runs, waits, or is runnable but
descheduled, so a thread's percentages are shares of its wall time; on a shared machine compare
them with the cores the worker actually got.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("easgd-sync-tau16", "easgd-async-tau16")
#: ``no-comm`` (each worker alone under Horovod, no collective at all): what Horovod and the
#: launcher cost with nothing on the wire
CHOICES = VARIANTS + ("no-comm",)
TRAINING = "MainThread"
EXCHANGE = "hvd-easgd-exchange"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------- parsing py-spy raw


@dataclass(frozen=True)
class Frame:
    """One stack frame: ``function (location)``; a Python frame's location is ``file.py:line``."""

    function: str
    location: str = ""

    @property
    def python(self) -> bool:
        return bool(re.search(r"\.py:\d+$", self.location))

    @property
    def file(self) -> str:
        return self.location.rsplit(":", 1)[0] if self.python else ""


@dataclass(frozen=True)
class Sample:
    """One collapsed stack of a raw py-spy file, root first, seen ``count`` times."""

    thread: str
    tid: int
    frames: Tuple[Frame, ...]
    count: int


_FRAME = re.compile(r"^(?P<function>.*?) \((?P<location>[^()]*)\)$")
_THREAD = re.compile(r"^thread \((?P<tid>(0x)?[0-9a-fA-F]+)\)(: ?(?P<name>.*))?$")


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text)
    return Frame(match["function"], match["location"]) if match else Frame(text)


def parse_line(line: str) -> Optional[Sample]:
    """``thread (TID): NAME;frame;...;frame COUNT`` (py-spy ``--threads --format raw``)."""
    line = line.rstrip("\n")
    stack, _, count = line.rpartition(" ")
    if not stack or not count.isdigit():
        return None
    parts = stack.split(";")
    thread = _THREAD.match(parts[0])
    if thread is None:  # recorded without --threads: everything is one thread
        return Sample("?", 0, tuple(parse_frame(p) for p in parts), int(count))
    tid = int(thread["tid"], 0) if thread["tid"].startswith("0x") else int(thread["tid"])
    frames = tuple(parse_frame(p) for p in parts[1:])
    return Sample(thread["name"] or native_thread_name(frames), tid, frames, int(count))


HOROVOD_THREAD = "horovod-background"


def native_thread_name(frames: Sequence[Frame]) -> str:
    """A name for a thread without a Python name (py-spy ``--native`` shows some of them)."""
    if any("BackgroundThreadLoop" in f.function or "horovod::common" in f.function
           for f in frames):
        return HOROVOD_THREAD
    if any("gloo::" in f.function for f in frames):
        return "gloo"
    return "unnamed"


def parse_raw(lines: Iterable[str]) -> List[Sample]:
    return [s for s in (parse_line(line) for line in lines) if s is not None]


def load_raw(path: Path) -> List[Sample]:
    with open(path) as f:
        return parse_raw(f)


# ---------------------------------------------------------------------- classification

Match = Callable[[Frame], bool]


def py(function: str, file_suffix: str = "") -> Match:
    """A Python frame of ``function`` (a qualified name) in a file ending with ``file_suffix``."""
    return lambda f: f.python and f.function == function and f.file.endswith(file_suffix)


def in_file(fragment: str, exclude: str = "\0") -> Match:
    return lambda f: f.python and fragment in f.file and exclude not in f.file


def named(*functions: str) -> Match:
    return lambda f: f.function in functions


def any_of(*matches: Match) -> Match:
    return lambda f: any(m(f) for m in matches)


#: Training-thread anchors: a sample belongs to the category of its *innermost* anchored frame.
TRAINING_RULES: List[Tuple[str, Match]] = [
    ("round: snapshot (gather)", py("CenterState.snapshot", "hvd_easgd/optim/center.py")),
    ("round: seal (d = x - c)", py("CenterState.seal", "hvd_easgd/optim/center.py")),
    ("round: finiteness check", any_of(py("CenterState.round_is_finite"),
                                       py("CenterState.locally_finite"))),
    ("round: rule (center update)", any_of(py("ElasticRule.apply", "hvd_easgd/optim/rules.py"),
                                           py("OuterRule.apply"),
                                           py("update_center_average"))),
    ("round: pull (scatter_add)", py("FlatGroup.scatter_add", "hvd_easgd/optim/flat.py")),
    ("round: start (enqueue allreduce)", any_of(py("Communicator.start"),
                                                py("BackgroundExchange.submit"))),
    ("round: wait", any_of(py("Communicator.wait"), py("wait_for_handle"),
                           py("BackgroundExchange.collect"))),
    ("round: non-finite recovery", any_of(py("skip_round"), py("nonfinite_ranks"),
                                          py("CenterState.bad_ranks"))),
    ("EASGD step bookkeeping", any_of(in_file("hvd_easgd/optim/optimizer.py"),
                                      in_file("hvd_easgd/optim/rounds.py"),
                                      in_file("hvd_easgd/optim/recovery.py"))),
    ("local optimizer step", in_file("torch/optim/", exclude="torch/optim/optimizer.py")),
    ("zero_grad", lambda f: f.python and f.function.endswith("zero_grad")),
    ("backward", any_of(in_file("torch/autograd/"), py("Tensor.backward"))),
    ("forward + loss", in_file("torch/nn/")),
    ("benchmark: setup / between windows", any_of(
        py("make_optimizer"), py("wait_submitted"), named("ElasticOptimizer.__init__"),
        py("barrier"), in_file("hvd_easgd/optim/checks.py"))),
    ("benchmark: instrumentation", in_file("benchmarks/common.py")),
]

SLEEP_LEAVES = ("time_sleep", "clock_nanosleep", "nanosleep", "__clock_nanosleep",
                "pysleep")
#: Refinement of a wait: what the waiting thread was doing.
WAIT_RULES: List[Tuple[str, Match]] = [
    ("sleeping between polls", named(*SLEEP_LEAVES)),
    ("polling (hvd.poll)", py("poll", "horovod/torch/mpi_ops.py")),
    ("Horovod call (synchronize / decompress)", any_of(
        in_file("horovod/torch/"), in_file("horovod/common/"))),
    ("blocked on the round's event", any_of(py("Event.wait"), py("Condition.wait"))),
]


def native(*fragments: str) -> Match:
    """A native frame whose function name contains one of ``fragments``."""
    return lambda f: not f.python and any(x in f.function for x in fragments)


#: Horovod's C++ background thread, when py-spy ``--native`` shows it.
HOROVOD_RULES: List[Tuple[str, Match]] = [
    ("sleeping (cycle time)", any_of(named(*SLEEP_LEAVES, "usleep"),
                                     native("sleep_for"))),
    ("fusion buffer / entry copies", native("MemcpyInFusionBuffer", "MemcpyOutFusionBuffer",
                                            "MemcpyEntry", "memcpy", "memmove")),
    ("allreduce (Gloo)", native("gloo::", "GlooAllreduce", "Allreduce")),
    ("coordination (negotiation, response cache)", native(
        "ComputeResponseList", "Controller", "ResponseCache", "CoordinateCacheAndState",
        "Response", "Request")),
]


def innermost(frames: Sequence[Frame], rules: Sequence[Tuple[str, Match]]) -> Optional[str]:
    """The category of the innermost frame any rule matches (leaf first)."""
    for frame in reversed(frames):
        for name, match in rules:
            if match(frame):
                return name
    return None


def classify_training(frames: Sequence[Frame]) -> str:
    category = innermost(frames, TRAINING_RULES) or "other"
    if category == "round: wait":
        detail = innermost(frames, WAIT_RULES)
        return f"round: wait ({detail})" if detail else category
    return category


def classify_exchange(frames: Sequence[Frame]) -> str:
    return innermost(frames, WAIT_RULES) or (
        "thread start / exit" if not any(py("Communicator.wait")(f) for f in frames) else
        "waiting code (Python)")


def classify_other(frames: Sequence[Frame]) -> str:
    named_ = [f for f in frames if f.python] or [f for f in frames
                                                  if not f.function.startswith("0x")]
    return f"in {named_[-1].function}" if named_ else "unknown"


Window = Tuple[str, int, int]  # (script file name, first line, last line) of the timed loop
OUTSIDE = "outside the timed window (setup, warm-up, between windows)"


def in_window(frames: Sequence[Frame], window: Window) -> Optional[bool]:
    """Whether the stack is inside the benchmark's timed loop (None: no ``measure`` frame)."""
    script, first, last = window
    for f in frames:
        if f.python and f.function == "measure" and Path(f.file).name == script:
            return first <= int(f.location.rsplit(":", 1)[1]) <= last
    return None


def classify(sample: Sample, window: Optional[Window] = None) -> str:
    if sample.thread == TRAINING:
        if window is not None and in_window(sample.frames, window) is False:
            return OUTSIDE
        return classify_training(sample.frames)
    if sample.thread == EXCHANGE:
        return classify_exchange(sample.frames)
    if sample.thread == HOROVOD_THREAD:
        return innermost(sample.frames, HOROVOD_RULES) or "other"
    return classify_other(sample.frames)


def thread_label(name: str) -> str:
    return {TRAINING: "training thread (MainThread)",
            EXCHANGE: "exchange thread (hvd-easgd-exchange)",
            HOROVOD_THREAD: "Horovod background thread (C++, seen by py-spy --native)",
            }.get(name, f"thread {name}")


def summarise_samples(samples: Sequence[Sample],
                      window: Optional[Window] = None) -> Dict[str, Dict[str, Any]]:
    """``{thread label: {samples, threads_seen, categories: {category: {samples, percent}}}}``;
    with ``window``, training-thread samples outside the timed loop get their own category."""
    per_thread: Dict[str, Counter] = {}
    tids: Dict[str, set] = {}
    for s in samples:
        label = thread_label(s.thread)
        per_thread.setdefault(label, Counter())[classify(s, window)] += s.count
        tids.setdefault(label, set()).add(s.tid)
    out: Dict[str, Dict[str, Any]] = {}
    for label, counts in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        out[label] = {
            "samples": total, "threads_seen": len(tids[label]),
            "categories": {c: {"samples": n, "percent": 100.0 * n / total}
                           for c, n in counts.most_common()},
        }
    return out


NATIVE_NAMES = (HOROVOD_THREAD, "gloo", "unnamed")


def python_tids(samples: Sequence[Sample]) -> List[int]:
    """The threads py-spy saw as Python threads (it shows only some native ones)."""
    return sorted({s.tid for s in samples if s.thread not in NATIVE_NAMES})


# ---------------------------------------------------------------------- /proc accounting


def process_ticks(pid: int) -> Optional[int]:
    """utime + stime of a whole process (its exited threads included), in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def thread_ticks(pid: int) -> Dict[int, Tuple[str, int]]:
    """``{tid: (comm, utime + stime)}`` of the process's live threads."""
    out: Dict[int, Tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (comm, int(fields[11]) + int(fields[12]))
    return out


def machine_ticks() -> Tuple[int, int]:
    """(busy, total) jiffies of the whole machine from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values[:8]) - idle, sum(values[:8])


@dataclass
class CpuSnapshot:
    at: float
    worker: Optional[int]
    peers: Dict[int, Optional[int]]
    profiler: Optional[int]
    threads: Dict[int, Tuple[str, int]]
    machine: Tuple[int, int]


def cpu_snapshot(worker: int, peers: Sequence[int], profiler: int) -> CpuSnapshot:
    return CpuSnapshot(time.monotonic(), process_ticks(worker),
                       {p: process_ticks(p) for p in peers}, process_ticks(profiler),
                       thread_ticks(worker), machine_ticks())


def cpu_report(before: CpuSnapshot, after: CpuSnapshot, worker: int,
               seen: Sequence[int]) -> Dict[str, Any]:
    """Cores (CPU seconds per wall second) each part took over the profiled window."""
    wall = after.at - before.at
    cores = lambda ticks: ticks / CLK_TCK / wall if wall > 0 else float("nan")  # noqa: E731
    delta = lambda tid: after.threads[tid][1] - before.threads[tid][1]  # noqa: E731
    both = set(before.threads) & set(after.threads)
    main = delta(worker) if worker in both else 0
    native = {tid: delta(tid) for tid in both if tid != worker and tid not in seen}
    total = (after.worker or 0) - (before.worker or 0)
    peers = sum((after.peers.get(p) or 0) - (b or 0) for p, b in before.peers.items())
    profiler = (after.profiler or 0) - (before.profiler or 0)
    busy = after.machine[0] - before.machine[0]
    # /proc/stat counts in USER_HZ like the per-process fields.
    by_comm: Counter = Counter()
    for tid, ticks in native.items():
        by_comm[after.threads[tid][0]] += ticks
    return {
        "wall_seconds": wall,
        "worker_cores": cores(total),
        "training_thread_cores": cores(main),
        "python_helper_threads_cores": cores(max(0, total - main - sum(native.values()))),
        "native_threads_cores": cores(sum(native.values())),
        "native_threads_by_name": {c: cores(t) for c, t in by_comm.most_common() if t},
        "native_threads": len(native),
        "peer_workers_cores": cores(peers),
        "profiler_cores": cores(profiler),
        "other_processes_cores": cores(busy - total - peers - profiler),
        "machine_busy_cores": cores(busy),
        "machine_cores": os.cpu_count(),
    }


# ---------------------------------------------------------------------- the job


def parent_map() -> Dict[int, List[int]]:
    """``{ppid: [pid, ...]}`` of every process (children of any thread of the parent)."""
    kids: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def descendants(pid: int) -> List[int]:
    kids = parent_map()
    out, todo = [], [pid]
    while todo:
        found = kids.get(todo.pop(), [])
        out += found
        todo += found
    return out


def cmdline(pid: int) -> List[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def horovod_rank(pid: int) -> Optional[int]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in env:
        if entry.startswith(b"HOROVOD_RANK="):
            return int(entry.split(b"=", 1)[1])
    return None


def is_worker(args: Sequence[str], script: str) -> bool:
    """A Python process running ``script`` (not horovodrun, not the ``sh -c`` around it)."""
    return (bool(args) and Path(args[0]).name.startswith("python")
            and any(Path(a).name == script for a in args[1:])
            and not any("horovodrun" in a for a in args))


def find_workers(root: int, script: str = "throughput.py") -> Dict[int, int]:
    """``{rank: pid}`` of the worker processes under ``root`` (a horovodrun)."""
    workers: Dict[int, int] = {}
    for pid in descendants(root):
        if is_worker(cmdline(pid), script):
            rank = horovod_rank(pid)
            workers[rank if rank is not None else 1000 + pid] = pid
    return workers


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             alive: Callable[[], bool] = lambda: True, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if not alive():
            raise RuntimeError(f"the job ended before {what}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def timed_window(script: Path = REPO / "benchmarks" / "throughput.py") -> Optional[Window]:
    """The lines of ``with stopwatch(): ...`` in ``measure`` of ``script``: the timed loop."""
    tree = ast.parse(script.read_text())
    for func in ast.walk(tree):
        if not (isinstance(func, ast.FunctionDef) and func.name == "measure"):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.With) and any(
                    isinstance(i.context_expr, ast.Call)
                    and getattr(i.context_expr.func, "id", None) == "stopwatch"
                    for i in node.items):
                return script.name, node.lineno, node.end_lineno or node.lineno
    return None


def dump_in_window(pid: int, window: Window, pyspy: str) -> bool:
    """One ``py-spy dump``: is the worker's training thread inside the timed loop?"""
    proc = subprocess.run([pyspy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                          timeout=60)
    main = proc.stdout.split('"MainThread"', 1)[-1].split("\nThread ", 1)[0]
    frames = [parse_frame(line.strip()) for line in main.splitlines() if line.strip()]
    return bool(in_window(frames, window))


def throughput_command(variant: str, args: argparse.Namespace) -> List[str]:
    python = sys.executable
    horovodrun = str(Path(python).with_name("horovodrun"))
    return [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo",
            "--start-timeout", str(int(args.start_timeout)),
            python, str(REPO / "benchmarks" / "throughput.py"),
            "--model", args.model, "--hidden", str(args.hidden), "--taus", "16",
            "--only", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--reps", "1", "--rotate", "1", *(["--batch", str(args.batch)] if args.batch else [])]


def job_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("HOROVOD_RANK", None)
    return env


def stop_job(job: subprocess.Popen, workers: Iterable[int], timeout: float = 20.0) -> None:
    """Stop horovodrun, then any of its workers still running (only the pids it started)."""
    if job.poll() is None:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(timeout)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait(timeout)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in workers if Path(f"/proc/{p}").exists() and cmdline(p)]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(2.0)


def record(pid: int, out: Path, duration: float, rate: int, pyspy: str,
           on_start: Callable[[int], None] = lambda pid: None,
           on_end: Callable[[], None] = lambda: None) -> None:
    """``py-spy record`` of ``pid``. ``on_start(py-spy's pid)`` runs when py-spy says it is
    sampling (after its attach and symbol loading, which can take seconds on a loaded machine);
    ``on_end()`` once it is done, before it is reaped (its CPU times are still readable)."""
    cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(int(duration)),
           "--rate", str(rate), "--threads", "--idle", "--native", "--format", "raw",
           "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    messages, started = [], False
    for line in proc.stdout:
        messages.append(line)
        if not started and "Sampling process" in line:
            on_start(proc.pid)
            started = True
    if not started:
        on_start(proc.pid)
    on_end()
    proc.wait(timeout=duration + 120)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({proc.returncode}): {''.join(messages)[-2000:]}")


def start_job(variant: str, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(throughput_command(variant, args), cwd=str(REPO), env=job_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_timed_loop(job: subprocess.Popen, args: argparse.Namespace,
                        window: Optional[Window]) -> Dict[int, int]:
    """Wait for both workers, then for rank 0 to be past its warm-up; ``{rank: pid}``."""
    alive = lambda: job.poll() is None  # noqa: E731
    workers = wait_for(lambda: (w := find_workers(job.pid)) and len(w) >= 2 and w,
                       args.start_timeout, "both worker processes", alive)
    if window is not None:
        wait_for(lambda: dump_in_window(workers[min(workers)], window, args.py_spy),
                 args.start_timeout, "the variant's timed loop", alive, interval=0.5)
    time.sleep(args.settle)
    if not alive():
        raise RuntimeError("the job ended before the profile started")
    return workers


def profile_worker(worker: int, peers: Sequence[int], raw: Path,
                   args: argparse.Namespace) -> Tuple[CpuSnapshot, CpuSnapshot]:
    """Record ``worker`` with py-spy; /proc CPU snapshots at the start and end of sampling."""
    snapshots: List[CpuSnapshot] = []
    profiler: List[int] = []

    def started(pid: int) -> None:
        profiler.append(pid)
        snapshots.append(cpu_snapshot(worker, peers, pid))

    record(worker, raw, args.duration, args.rate, args.py_spy, on_start=started,
           on_end=lambda: snapshots.append(cpu_snapshot(worker, peers, profiler[0])))
    return snapshots[0], snapshots[1]


def profile_variant(variant: str, args: argparse.Namespace, workdir: Path) -> Dict[str, Any]:
    """Run the job, profile its rank-0 worker after the warm-up, stop it, classify."""
    window = timed_window()
    log_path, raw = workdir / f"{variant}.log", workdir / f"{variant}.raw"
    job = start_job(variant, args, log_path)
    workers: Dict[int, int] = {}
    try:
        workers = wait_for_timed_loop(job, args, window)
        worker = workers[min(workers)]
        peers = [p for p in workers.values() if p != worker]
        before, after = profile_worker(worker, peers, raw, args)
        ended_early = job.poll() is not None
    finally:
        stop_job(job, workers.values())
    result = analyse(raw, window)
    result.update(variant=variant, rank=min(workers), worker_pid=worker, peer_pids=peers,
                  log=str(log_path), job_ended_during_profile=ended_early,
                  cpu=cpu_report(before, after, worker, python_tids(load_raw(raw))))
    return result


def analyse(raw: Path, window: Optional[Window] = None) -> Dict[str, Any]:
    samples = load_raw(raw)
    return {"raw": str(raw), "samples": sum(s.count for s in samples), "timed_window": window,
            "threads": summarise_samples(samples, window)}


# ---------------------------------------------------------------------- report


def render(result: Dict[str, Any], min_percent: float = 0.05) -> str:
    title = result.get("variant") or result["raw"]
    lines = [f"## {title}: {result['samples']} py-spy samples (rank-0 worker)", "",
             "| thread | category | samples | % of thread |", "|---|---|---:|---:|"]
    for label, thread in result["threads"].items():
        for category, c in thread["categories"].items():
            if c["percent"] >= min_percent:
                lines.append(f"| {label} | {category} | {c['samples']} | {c['percent']:.1f} |")
    cpu = result.get("cpu")
    if cpu:
        lines += ["", render_cpu(cpu)]
    if result.get("job_ended_during_profile"):
        lines.append("WARNING: the job ended during the profile; raise --steps")
    return "\n".join(lines)


def render_cpu(cpu: Dict[str, Any]) -> str:
    rows = [("rank-0 worker, all threads", cpu["worker_cores"]),
            ("  training thread", cpu["training_thread_cores"]),
            ("  Python helper threads (exchange)", cpu["python_helper_threads_cores"]),
            ("  native threads (Horovod background loop, Gloo)",
             cpu["native_threads_cores"]),
            ("peer worker(s)", cpu["peer_workers_cores"]),
            ("py-spy (the profiler itself)", cpu["profiler_cores"]),
            ("other processes on the machine", cpu["other_processes_cores"]),
            ("machine busy", cpu["machine_busy_cores"])]
    lines = [f"CPU over the {cpu['wall_seconds']:.1f} s window (cores; the machine has "
             f"{cpu['machine_cores']}), from /proc:", "", "| who | cores |", "|---|---:|"]
    lines += [f"| {who} | {value:.2f} |" for who, value in rows]
    if cpu["native_threads_by_name"]:
        named_ = ", ".join(f"{c}: {v:.2f}" for c, v in cpu["native_threads_by_name"].items())
        lines.append(f"\nnative threads by name: {named_}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=CHOICES)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of profile")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait, once the worker is inside the variant's timed loop "
                        "(after its warm-up), before the profile starts")
    p.add_argument("--model", choices=("heavy", "cifar"), default="heavy")
    p.add_argument("--hidden", type=int, default=4096, help="width of the heavy MLP")
    p.add_argument("--batch", type=int, default=None, help="per-worker batch (script default)")
    p.add_argument("--warmup", type=int, default=16, help="throughput.py --warmup")
    p.add_argument("--steps", type=int, default=1_000_000,
                   help="throughput.py --steps: more than the profile needs (the job is stopped)")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--py-spy", default=str(Path(sys.executable).with_name("py-spy")))
    p.add_argument("--out-dir", default=None, help="keep the logs and raw profiles here")
    p.add_argument("--analyze", nargs="+", default=None, metavar="RAW",
                   help="only classify these py-spy raw files")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    results: List[Dict[str, Any]] = []
    if args.analyze:
        runs: Iterable[Callable[[], Dict[str, Any]]] = [
            lambda raw=raw: analyse(Path(raw)) for raw in args.analyze]
    else:
        workdir = Path(args.out_dir or tempfile.mkdtemp(prefix="profile_round-"))
        workdir.mkdir(parents=True, exist_ok=True)
        runs = [lambda v=v: profile_variant(v, args, workdir) for v in args.variants]
    for run in runs:  # one job at a time; each table as soon as it is known
        results.append(run())
        print(render(results[-1]), end="\n\n", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"benchmark": "profile_round",
                                               "config": vars(args), "results": results},
                                              indent=2))
    return results


if __name__ == "__main__":
    main()
