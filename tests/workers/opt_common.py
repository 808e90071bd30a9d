"""Shared helpers of the optimizer worker scripts (run under horovodrun).

Every worker builds its model/data/optimizer from a `tests.reference.Case`, so the tests can
replay the same configuration in the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import traceback
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
# Allreduce counting: wrap Horovod's real functions (public names in horovod.torch and
# horovod.torch.mpi_ops, plus the private dispatchers all of them go through). Nested calls
# (allreduce -> allreduce_async -> _allreduce_async) count once.
# ------------------------------------------------------------------------------------------

_COUNTED = (
    "allreduce", "allreduce_async", "allreduce_", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_async", "grouped_allreduce_",
    "grouped_allreduce_async_",
)
_PRIVATE = ("_allreduce_async", "_grouped_allreduce_async")


class AllreduceCounter:
    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._saved = []
        self.installed = False

    def _wrap(self, fn):
        counter = self

        def wrapper(*args, **kwargs):
            depth = getattr(counter._tls, "depth", 0)
            if depth == 0:
                with counter._lock:
                    counter.count += 1
            counter._tls.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._tls.depth = depth

        wrapper.__wrapped__ = fn
        return wrapper

    def install(self):
        assert not self.installed
        originals = {}
        for name in _COUNTED + _PRIVATE:
            originals[name] = getattr(mpi_ops, name)
        wrapped = {name: self._wrap(fn) for name, fn in originals.items()}
        for mod in (hvd, mpi_ops):
            for name in _COUNTED + _PRIVATE:
                if hasattr(mod, name):
                    self._saved.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, wrapped[name])
        self.installed = True
        return self

    def uninstall(self):
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()
        self.installed = False

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


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
    "hvd", "mpi_ops", "hvd_easgd", "torch", "os", "json", "Case", "AllreduceCounter",
    "parse_args", "init", "build", "wrapper_kwargs", "center_list", "snapshot", "stats_dict",
    "counters", "train_steps", "error_text", "float_buffers_list", "write", "cases_from",
]
