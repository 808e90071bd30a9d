"""Shared helpers of the optimizer worker scripts (run under horovodrun).

Every worker builds its model/data/optimizer from a `tests.reference.Case`, so the tests can
replay the same configuration in the single-process reference.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402
import horovod.torch.mpi_ops as mpi_ops  # noqa: E402

import hvd_easgd  # noqa: E402
from tests.hvdrun import write_rank_result  # noqa: E402
from tests.reference import (  # noqa: E402
    OUTER_FACTORIES, Case, build_model, build_optimizer, flat, float_buffers, local_backward,
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="[]", help="JSON list of Case dicts")
    ap.add_argument("--what", default="", help="script-specific selector")
    return ap.parse_args(argv)


def init():
    hvd.init()
    return hvd.rank(), hvd.size()


# ------------------------------------------------------------------------------------------
# Metering collectives from outside: wrap Horovod's real functions (the public names in
# horovod.torch and horovod.torch.mpi_ops, plus the private dispatchers they all go through,
# which the product may call directly). The product looks these up on the module at call time,
# so every collective it starts, on any thread, passes through a wrapper. Nested calls
# (allreduce -> allreduce_async -> _allreduce_async) are recorded once, by the outermost.
# ------------------------------------------------------------------------------------------

_FAMILIES = {
    "allreduce": ("allreduce", "allreduce_async", "allreduce_", "allreduce_async_",
                  "grouped_allreduce", "grouped_allreduce_async", "grouped_allreduce_",
                  "grouped_allreduce_async_", "_allreduce_async", "_grouped_allreduce_async"),
    "allgather": ("allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async",
                  "_allgather_async", "_grouped_allgather_async"),
    "broadcast": ("broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
                  "_broadcast_async"),
}


@dataclass(frozen=True)
class Collective:
    """One collective handed to Horovod: its family, the ranks of its process set and the bytes
    of the tensors this worker handed in."""

    family: str
    ranks: tuple
    nbytes: int
    stamp: object = None  # what the meter's `stamp()` said when the collective was handed over


def _tensors_of(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class CollectiveMeter:
    """Records every collective this process hands to Horovod while installed (a context
    manager). Thread-safe: the async exchange thread's collectives are recorded too."""

    def __init__(self, stamp=lambda: None) -> None:
        self.calls: list = []
        self._stamp = stamp
        self._lock = threading.Lock()
        self._depth = threading.local()
        self._saved: list = []

    def calls_of(self, family: str) -> int:
        """How many collectives of ``family`` ("allreduce", "allgather", "broadcast")."""
        with self._lock:
            return sum(1 for c in self.calls if c.family == family)

    def of(self, family: str) -> list:
        """The collectives of ``family`` so far, in the order they were handed over."""
        with self._lock:
            return [c for c in self.calls if c.family == family]

    def bytes_by_ranks(self) -> dict:
        """{ranks of a process set: bytes handed to collectives over it}, every family."""
        out: dict = {}
        with self._lock:
            for c in self.calls:
                out[c.ranks] = out.get(c.ranks, 0) + c.nbytes
        return out

    def _record(self, family: str, signature, args, kwargs) -> None:
        bound = signature.bind_partial(*args, **kwargs).arguments
        first = bound.get("tensor", bound.get("tensors"))
        nbytes = sum(t.numel() * t.element_size() for t in _tensors_of(first))
        process_set = bound.get("process_set", mpi_ops.global_process_set)
        ranks = tuple(process_set.ranks) if process_set.ranks is not None else ()
        with self._lock:
            self.calls.append(Collective(family, ranks, nbytes, self._stamp()))

    def _wrap(self, family: str, fn):
        meter, signature = self, inspect.signature(fn)

        def wrapper(*args, **kwargs):
            depth = getattr(meter._depth, "n", 0)
            if depth == 0:
                meter._record(family, signature, args, kwargs)
            meter._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                meter._depth.n = depth

        wrapper.__wrapped__ = fn
        return wrapper

    def install(self) -> "CollectiveMeter":
        assert not self._saved, "already installed"
        for family, names in _FAMILIES.items():
            for name in names:
                wrapped = self._wrap(family, getattr(mpi_ops, name))
                for mod in (hvd, mpi_ops):
                    if hasattr(mod, name):
                        self._saved.append((mod, name, getattr(mod, name)))
                        setattr(mod, name, wrapped)
        return self

    def uninstall(self) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()

    def __enter__(self) -> "CollectiveMeter":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


class AllreduceCounter(CollectiveMeter):
    """A :class:`CollectiveMeter` read as one number: the allreduces so far."""

    @property
    def count(self) -> int:
        return self.calls_of("allreduce")


# ------------------------------------------------------------------------------------------
# Building the wrapper from a Case
# ------------------------------------------------------------------------------------------


def wrapper_kwargs(case: Case, model) -> dict:
    kw = dict(
        named_parameters=model.named_parameters(), tau=case.tau, method=case.method,
        mode=case.mode,
    )
    if case.alpha is not None:
        kw["alpha"] = case.alpha
        kw["beta"] = None
    else:
        kw["beta"] = case.beta
    if case.compression == "fp16":
        kw["compression"] = hvd.Compression.fp16
    if case.buffers:
        kw["named_buffers"] = model.named_buffers()
    if case.center_average is not None:
        kw["center_average"] = case.center_average
        if case.center_average == "moving":
            kw["center_average_rate"] = case.average_rate
    if case.method == "mdownpour":
        kw["master_momentum"] = case.master_momentum
    kw.update(case.extra)
    if "outer_optimizer" in kw:  # Case.extra names one of tests.reference.OUTER_FACTORIES
        kw["outer_optimizer"] = OUTER_FACTORIES[kw["outer_optimizer"]]
    return kw


def build(case: Case, rank: int):
    model = build_model(case, rank)
    base = build_optimizer(case, model.parameters())
    opt = hvd_easgd.ElasticOptimizer(base, **wrapper_kwargs(case, model))
    return model, base, opt


def center_list(opt, model) -> list:
    sd = opt.center_state_dict()
    return flat(sd[n] for n, _ in model.named_parameters())


def avg_center_list(opt, model) -> list:
    sd = opt.averaged_center_state_dict()
    return flat(sd[n] for n, _ in model.named_parameters())


def stats_dict(opt) -> dict:
    s = opt.stats
    if hasattr(s, "as_dict"):
        return dict(s.as_dict())
    if hasattr(s, "_asdict"):
        return dict(s._asdict())
    if hasattr(s, "__dict__"):
        return {k: v for k, v in vars(s).items() if isinstance(v, (int, float, bool, str))}
    return {}


def counters(opt) -> dict:
    return {"steps": int(opt.step_count), "rounds": int(opt.round_count)}


def snapshot(case: Case, opt, model) -> dict:
    out = {
        "params": flat(model.parameters()),
        "center": center_list(opt, model),
        "counters": counters(opt),
        "stats": stats_dict(opt),
    }
    if case.center_average is not None:
        out["avg_center"] = avg_center_list(opt, model)
    if case.buffers:
        out["buffers"] = flat(b for _, b in float_buffers(model))
    return out


def train_steps(case: Case, model, opt, rank: int, start: int, stop: int, per_step=None):
    """Steps start+1 .. stop (the data of step t depends on t only)."""
    for t in range(start + 1, stop + 1):
        local_backward(model, opt, case, rank, t)
        opt.step()
        if per_step is not None:
            per_step(t)


def float_buffers_list(model) -> list:
    return flat(b for _, b in float_buffers(model))


def error_text(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def run_items(args, rank: int, handlers: dict) -> list:
    """Run every JSON item of ``--cases`` with the handler of its ``kind``; an item that raises
    is reported, not raised, so the job goes on and the test names the failing case."""
    results = []
    for item in json.loads(args.cases):
        try:
            results.append({"ok": True, **handlers[item["kind"]](item, rank)})
        except Exception as exc:  # noqa: BLE001
            results.append({"ok": False, "error": error_text(exc)})
    return results


def write(out_dir: str, rank: int, result: dict):
    write_rank_result(out_dir, rank, result)


def cases_from(args) -> list:
    return [Case.from_dict(d) for d in json.loads(args.cases)]


__all__ = [
    "run_items",
    "hvd", "mpi_ops", "hvd_easgd", "torch", "os", "json", "Case", "AllreduceCounter", "CollectiveMeter", "Collective",
    "parse_args", "init", "build", "wrapper_kwargs", "center_list", "snapshot", "stats_dict",
    "counters", "train_steps", "error_text", "float_buffers_list", "write", "cases_from",
]
