"""Shared pieces of the benchmarks: models, Horovod collective counters, timing and tables.

The counters wrap Horovod's own entry points, so every variant (``hvd.DistributedOptimizer``
included) is measured by the same instrument: :class:`CollectiveMeter` counts each allreduce
request and the bytes handed to it, and times how long the *training* thread blocks in
``synchronize``. Nothing here changes what Horovod does.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

#: Input of the communication-heavy MLP: a flattened 3x32x32 image.
HEAVY_INPUT = 3 * 32 * 32
HEAVY_HIDDEN = 4096
#: Sleep between polls of a collective with ``CollectiveMeter(polite_wait=True)``.
POLITE_WAIT_SLEEP = 0.0002


def setup_worker(threads: int = 1) -> None:
    """One compute thread per worker (the machine's cores are shared by all workers)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals would make timings depend on the weights


def heavy_mlp(hidden: int = HEAVY_HIDDEN, num_classes: int = 10) -> nn.Module:
    """A wide MLP, 3072 -> hidden -> 3072 -> classes: ~25.2 M parameters at ``hidden=4096``.

    ResNet-50-sized in parameters (25.6 M) but with little compute per parameter, so with a
    small batch the exchange of parameters or gradients dominates a step.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(HEAVY_INPUT, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, HEAVY_INPUT),
        nn.ReLU(inplace=True),
        nn.Linear(HEAVY_INPUT, num_classes),
    )


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and the shape of one input sample."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: Sequence[int]
    num_classes: int
    default_batch: int


def model_spec(name: str, hidden: int = HEAVY_HIDDEN) -> ModelSpec:
    """``cifar``: the paper's CIFAR-10 net at 28x28; ``heavy``: :func:`heavy_mlp`."""
    if name == "cifar":
        from hvd_easgd.train.models import build_model

        return ModelSpec("cifar", lambda: build_model("cifar_paper", 10), (3, 28, 28), 10, 128)
    if name == "heavy":
        return ModelSpec("heavy", lambda: heavy_mlp(hidden), (3, 32, 32), 10, 32)
    raise ValueError(f"unknown model {name!r}; choose 'cifar' or 'heavy'")


def job_env(threads: int, extra: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, str]:
    """The environment of a benchmark job started from this process: ``threads`` compute
    threads, the repo importable, loopback Gloo, and no rank variables leaking in from a job
    this process may itself run in. ``extra`` sets variables (``None`` removes one)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torch's Gloo: loopback (one machine)
    env.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", "120")
    for key in ("HOROVOD_RANK", "HOROVOD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def synthetic_batch(spec: "ModelSpec", batch: int, rank: int):
    """Rank ``rank``'s fixed synthetic batch, the same in every benchmark (seed ``1234 + rank``)."""
    gen = torch.Generator().manual_seed(1234 + rank)
    return (torch.randn(batch, *spec.input_shape, generator=gen),
            torch.randint(0, spec.num_classes, (batch,), generator=gen))


def fresh_model(spec: "ModelSpec", lr: float, device: Optional[torch.device] = None):
    """The model every benchmark variant starts from (seed 0) and its ``SGD(momentum=0.9)``."""
    torch.manual_seed(0)
    model = spec.build().to(device or "cpu")
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> None:
    """One step of the benchmarks' training loop: zero the gradients, forward, backward, step."""
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def distribute(base: torch.optim.Optimizer, model: nn.Module, method: Optional[str],
               tau: Optional[int] = None, mode: str = "sync", compression: Any = None,
               **elastic: Any) -> torch.optim.Optimizer:
    """The benchmarks' one mapping from a method to the optimizer that distributes ``base``:
    ``None``: ``base`` alone (no communication); ``"sgd"``: ``hvd.DistributedOptimizer``
    (synchronous SGD, the parameters broadcast from rank 0 first); any other name:
    ``hvd_easgd.ElasticOptimizer(method=...)`` with ``tau``, ``mode`` and ``elastic``."""
    if method is None:
        return base
    import horovod.torch as hvd

    wire = {} if compression is None else {"compression": compression}
    if method == "sgd":
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), **wire)
    import hvd_easgd

    return hvd_easgd.ElasticOptimizer(base, model.named_parameters(), tau=tau, method=method,
                                      mode=mode, **wire, **elastic)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def resolve_device(name: str) -> torch.device:
    """``cpu``, or ``cuda`` (this worker's GPU: ``hvd.local_rank()``)."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        import horovod.torch as hvd

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(hvd.local_rank())
        return torch.device("cuda", hvd.local_rank())
    raise SystemExit(f"unknown --device {name!r}; choose cpu or cuda")


def device_sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Window:
    """A timed window of training: wall-clock, this process's CPU, the machine's busy CPU."""

    seconds: float
    cpu_seconds: float
    machine_busy_seconds: Optional[float]


def timed_window(step: Callable[[], None], steps: int) -> Window:
    """Run ``step`` ``steps`` times and time it (wall-clock, CPU, the machine's busy time)."""
    busy0, cpu0 = machine_busy_seconds(), time.process_time()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    cpu, busy1 = time.process_time() - cpu0, machine_busy_seconds()
    return Window(elapsed, cpu, None if busy0 is None or busy1 is None else busy1 - busy0)


class Patches:
    """Library functions replaced by counting wrappers, and put back by :meth:`close`.

    The benchmarks count collectives from outside the code they measure: by wrapping the
    library's own entry points (Horovod's, torch.distributed's) for the length of a run.
    """

    def __init__(self) -> None:
        self._saved: List[tuple] = []

    def wrap(self, module: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        """Replace ``module.name`` by ``make(original)``."""
        original = getattr(module, name)
        setattr(module, name, make(original))
        self._saved.append((module, name, original))

    def close(self) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()


# ------------------------------------------------------------------------------ Horovod meter


class CollectiveMeter:
    """Counts Horovod allreduce requests and bytes; times the training thread's waits.

    Wraps ``horovod.torch.mpi_ops._allreduce_async`` and ``_grouped_allreduce_async`` (every
    public allreduce variant, ``hvd.DistributedOptimizer``'s per-gradient ``allreduce_async_``
    and hvd-easgd's fused ``grouped_allreduce_async`` all go through one of them) and
    ``synchronize`` wherever it is bound (``horovod.torch``, ``mpi_ops``, ``optimizer``).

    ``calls`` counts collective requests as the framework submits them (one per tensor for
    ``hvd.DistributedOptimizer``; Horovod may still fuse several into one ring operation);
    ``bytes`` is the size of the tensors submitted, i.e. after wire compression.
    ``blocked_seconds`` only counts ``synchronize`` calls on the thread that created the meter
    (the training thread), not those of hvd-easgd's background exchange thread.

    ``polite_wait=True`` is an experiment, off by default: Horovod 0.28's ``synchronize``
    waits in a ``std::this_thread::yield()`` loop, i.e. it keeps a core busy for as long as the
    collective is on the wire. With it, every ``synchronize`` (any thread, any variant) first
    sleeps in short steps until ``hvd.poll`` says the result is there, so waiting threads leave
    the CPU to compute and to Horovod's own background thread.
    """

    def __init__(self, polite_wait: bool = False) -> None:
        import horovod.torch as hvd_pkg
        import horovod.torch.mpi_ops as mpi_ops
        import horovod.torch.optimizer as hvd_opt

        self._lock = threading.Lock()
        self._owner = threading.get_ident()
        self._poll = mpi_ops.poll if polite_wait else None
        self.calls = 0
        self.bytes = 0
        self.blocked_seconds = 0.0
        self._patches = Patches()
        self._patches.wrap(mpi_ops, "_allreduce_async", self._count_single)
        self._patches.wrap(mpi_ops, "_grouped_allreduce_async", self._count_group)
        for module in (mpi_ops, hvd_pkg, hvd_opt):
            self._patches.wrap(module, "synchronize", self._timed)

    def _count_single(self, original: Callable) -> Callable:
        def counted(tensor, output, *args, **kwargs):
            with self._lock:
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size()
            return original(tensor, output, *args, **kwargs)

        return counted

    def _count_group(self, original: Callable) -> Callable:
        def counted(tensors, outputs, *args, **kwargs):
            with self._lock:
                self.calls += 1
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return original(tensors, outputs, *args, **kwargs)

        return counted

    def _timed(self, original: Callable) -> Callable:
        def wait(handle):
            if self._poll is not None:
                while not self._poll(handle):
                    time.sleep(POLITE_WAIT_SLEEP)
            return original(handle)

        def timed(handle):
            if threading.get_ident() != self._owner:
                return wait(handle)
            started = time.perf_counter()
            try:
                return wait(handle)
            finally:
                self.blocked_seconds += time.perf_counter() - started

        return timed

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.bytes = 0
            self.blocked_seconds = 0.0

    def snapshot(self) -> Dict[str, float]:
        with self._lock:
            return {"calls": self.calls, "bytes": self.bytes, "blocked": self.blocked_seconds}

    def close(self) -> None:
        """Restore Horovod's original functions."""
        self._patches.close()


def thread_cpu_seconds() -> Optional[Dict[str, float]]:
    """CPU seconds (user + system) of this process's main thread and of all its other threads.

    The other threads are Horovod's background thread (which runs the Gloo/MPI collectives:
    copies through the kernel and the reduction), its helpers, and hvd-easgd's exchange thread.
    Linux only (``/proc/self/task``); ``None`` elsewhere.
    """
    task = Path("/proc/self/task")
    if not task.is_dir():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    main, others = 0, 0
    for entry in task.iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        if int(entry.name) == os.getpid():
            main += ticks
        else:
            others += ticks
    return {"main": main / tick, "others": others / tick}


def machine_busy_seconds() -> Optional[float]:
    """CPU seconds the whole machine (every process, every core) has been busy since boot.

    The difference over a timed window, minus the CPU time of the job's own processes, is what
    *other* processes took meanwhile: the benchmarks record it (``foreign_cores``) so that a
    measurement disturbed by another job on a shared machine can be seen, or measured again.
    Linux only (``/proc/stat``); ``None`` elsewhere.
    """
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals) - idle) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ output


def environment() -> Dict[str, Any]:
    """Versions and machine, for the JSON record (Horovod's version without importing it)."""
    from importlib.metadata import version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "horovod": version("horovod"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(payload, indent=2))


@contextmanager
def stopwatch() -> Iterator[List[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box = [0.0]
    started = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - started
