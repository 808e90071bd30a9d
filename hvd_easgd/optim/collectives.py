"""The collectives the algorithm needs, in one place: the only module of the layer that talks to
Horovod (besides :mod:`hvd_easgd.optim.tuning`, which sets its environment before ``hvd.init()``).

The rules, the rounds and the center never name Horovod: they call these functions. A second
backend (torch.distributed) would be a second implementation of this small surface.

Every function looks Horovod's function up on its module at call time, so that a wrapper
installed on ``horovod.torch`` (tests count collectives that way) sees every call.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Sequence, Tuple

import horovod.torch as hvd
import horovod.torch.mpi_ops as mpi_ops
import torch

#: Horovod's wire compressors (``Compression.none``, ``Compression.fp16``) and reductions.
Compression = hvd.Compression
AVERAGE, SUM, ADASUM = hvd.Average, hvd.Sum, hvd.Adasum
#: Every worker of the job.
GLOBAL_SET = hvd.global_process_set

#: First and longest sleep between two polls of a collective (seconds): a result is noticed at
#: most this late.
MIN_POLL_SLEEP = 50e-6
MAX_POLL_SLEEP = 1e-3


class Cancelled(Exception):
    """A collective was given up on (its ``cancelled()`` turned true) while being waited for."""


def size() -> int:
    return hvd.size()


def rank() -> int:
    return hvd.rank()


# ---------------------------------------------------------------------- started, then waited for


def sum_into_async(sent: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], name: str,
                   process_set: Any) -> Any:
    """Start one grouped sum of ``sent`` into ``outputs`` (buffers the caller keeps); a handle.

    ``hvd.grouped_allreduce_async`` allocates its outputs on every call; this is the function it
    calls with them (Horovod 0.28), so a round allocates nothing.
    """
    return mpi_ops._grouped_allreduce_async(list(sent), list(outputs), name, hvd.Sum, 1.0, 1.0,
                                            process_set)


def average_async_(tensors: Sequence[torch.Tensor], name: str, process_set: Any) -> Any:
    """Start one grouped in-place average of ``tensors`` over ``process_set``; a handle."""
    return hvd.grouped_allreduce_async_(list(tensors), op=hvd.Average, name=name,
                                        process_set=process_set)


def allgather_async(tensors: Sequence[torch.Tensor], name: str, process_set: Any) -> Any:
    """Start one grouped allgather of ``tensors`` over ``process_set``; a handle."""
    return hvd.grouped_allgather_async(list(tensors), name=name, process_set=process_set)


def wait(handle: Any, cancelled: Callable[[], bool] = lambda: False) -> Any:
    """The result of a started collective, waited for without spinning: poll, sleep, back off.

    ``hvd.synchronize`` busy-loops while the collective is on the wire, taking a core from
    training; this sleeps between polls instead (up to :data:`MAX_POLL_SLEEP`). Raises
    :class:`Cancelled` if ``cancelled()`` turns true first (the handle is then left alone: after
    a Horovod Elastic reset its number may belong to a new collective).
    """
    delay = MIN_POLL_SLEEP
    while not hvd.poll(handle):
        if cancelled():
            raise Cancelled()
        time.sleep(delay)
        delay = min(2 * delay, MAX_POLL_SLEEP)
    if cancelled():
        raise Cancelled()
    return hvd.synchronize(handle)


# ---------------------------------------------------------------------- blocking


def allgather(tensor: torch.Tensor, name: str, process_set: Any = GLOBAL_SET) -> torch.Tensor:
    return hvd.allgather(tensor, name=name, process_set=process_set)


def allgather_object(obj: Any, name: str) -> List[Any]:
    """Every worker's ``obj``, in rank order."""
    return hvd.allgather_object(obj, name=name)


def broadcast_object(obj: Any, root_rank: int, name: str) -> Any:
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str,
               process_set: Any = GLOBAL_SET) -> None:
    hvd.broadcast_(tensor, root_rank=root_rank, name=name, process_set=process_set)


def broadcast_parameters(named: Sequence[Tuple[str, torch.Tensor]], root_rank: int) -> None:
    """Overwrite every worker's tensors with ``root_rank``'s, in place. Horovod has no bfloat16
    collectives: those go bit for bit as int16."""
    hvd.broadcast_parameters([(n, t.detach().view(torch.int16) if t.dtype == torch.bfloat16
                               else t) for n, t in named], root_rank=root_rank)


# ---------------------------------------------------------------------- process sets


def process_set(ranks: Sequence[int]) -> Any:
    """An unregistered process set of ``ranks`` (for ``hvd.init(process_sets=...)``)."""
    return hvd.ProcessSet(list(ranks))


def registered_process_set(ranks: Sequence[int]) -> Any:
    """The process set Horovod has registered with exactly these ranks, or None."""
    from horovod.torch.mpi_ops import _basics

    for set_id, members in _basics._get_process_set_ids_and_ranks().items():
        if sorted(members) == sorted(ranks):
            found = hvd.ProcessSet(sorted(ranks))
            found.process_set_id = set_id
            return found
    return None


def add_process_set(ranks: Sequence[int]) -> Any:
    """Register a process set (every worker calls it, in the same order)."""
    return hvd.add_process_set(list(ranks))


# ---------------------------------------------------------------------- Horovod Elastic


def state_handler_base() -> type:
    """``hvd.elastic.TorchState``'s base class for the handler of one kind of object."""
    from horovod.torch.elastic.state import StateHandler

    return StateHandler


def register_state_handler(kind: type, handler: type) -> None:
    """Make ``hvd.elastic.TorchState`` handle objects of ``kind`` with ``handler`` (first in
    Horovod's registry, idempotent)."""
    from horovod.torch.elastic import state as hvd_state

    registry = list(hvd_state.get_handler_registry())
    if any(known is kind for known, _ in registry):
        return
    hvd_state.set_handler_registry([(kind, handler)] + registry)
