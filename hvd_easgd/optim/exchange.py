"""Communication: one fused Horovod allreduce per round, waited for politely.

:class:`Communicator` sums a list of flat buffers (one per dtype/device) over all workers with a
single grouped Horovod allreduce, optionally compressed on the wire (the center itself never
is). The caller's thread only enqueues the request; Horovod's own background thread moves
the bytes.

Nothing is allocated per round. A fresh 100 MB output costs the process a page fault per 4 KiB
page and an ``munmap`` when freed (glibc serves blocks over 32 MiB with ``mmap``): on 2 CPU
workers, ``hvd.grouped_allreduce_async`` of a 25 M-parameter round took 240 ms of CPU with a
fresh output and 125-160 ms with a kept one. :class:`WireBuffers` therefore keeps Horovod's
output and, for fp16 compression and bfloat16 buffers, the cast copies there and back, and hands
them to Horovod's own out-of-place allreduce.

Waiting never spins. Horovod 0.28's ``hvd.synchronize`` busy-loops (``yield`` between polls) for
as long as the collective is on the wire, which takes a whole core from training when there are
as many workers as cores. :meth:`Communicator.wait` instead polls the handle and sleeps between
polls (backing off to :data:`MAX_POLL_SLEEP`), and stops early when the round is cancelled.

:class:`BackgroundExchange` waits for a round on a short-lived daemon thread, so that in async
mode the training thread only starts and applies rounds. A round can be *cancelled* (Horovod
Elastic reset): its thread stops polling the old handle at its next wake-up and its result is
dropped; nothing ever joins it, so a reset cannot hang on it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import horovod.torch as hvd
import horovod.torch.mpi_ops as mpi_ops
import torch

#: First and longest sleep between two polls of a collective (seconds). A round lands at most
#: this late; rounds take milliseconds to seconds, so it costs nothing measurable.
MIN_POLL_SLEEP = 50e-6
MAX_POLL_SLEEP = 1e-3


class RoundCancelled(Exception):
    """A round was dropped (Horovod Elastic reset) while it was being waited for."""


@dataclass
class ExchangeStats:
    """Counters an :class:`~hvd_easgd.ElasticOptimizer` exposes as ``opt.stats``.

    ``comm_seconds`` is the time a round spends from being handed to Horovod until its result
    is back (on whichever thread waits for it); ``wait_seconds`` is the time the *training*
    thread is blocked on rounds. In sync mode the two are about equal and every round stalls
    training; in async mode ``wait_seconds`` only grows, and ``stalls`` only counts, when a round
    is still on the wire at the next round step (or at ``synchronize()``).
    ``skipped_rounds`` counts rounds that no worker applied because some worker's contribution
    was not finite; ``dropped_rounds`` rounds abandoned by a Horovod Elastic reset; ``resets``
    the resets this optimizer went through. ``cross_group_bytes`` counts the bytes this worker
    hands to collectives that span groups of workers (every round's bytes, unless
    ``hierarchy=`` splits a round into slices); ``group_bytes`` those that stay inside its group
    (``hierarchy=``: gradient allreduces and the allgather of a round's slices); see
    :mod:`hvd_easgd.optim.hierarchy`.
    """

    steps: int = 0
    rounds: int = 0
    allreduce_calls: int = 0
    bytes_communicated: int = 0
    comm_seconds: float = 0.0
    wait_seconds: float = 0.0
    stalls: int = 0
    skipped_rounds: int = 0
    dropped_rounds: int = 0
    resets: int = 0
    cross_group_bytes: int = 0
    group_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Pending:
    """A round handed to Horovod and not yet collected. ``contexts`` says, per tensor, how to
    turn Horovod's output into the result (:meth:`WireBuffers.receive`)."""

    handle: Any
    contexts: Tuple[Any, ...]
    started: float


#: Layouts of round buffers whose wire buffers are kept (an optimizer has one); more are dropped.
MAX_KEPT = 4


class WireBuffers:
    """The buffers of a round's allreduce, allocated once and reused by every round.

    A communicator has at most one round in flight, and its result is applied before the next
    round starts, so one set serves every round of the same layout (async mode's two round
    buffers included): memory stays at one output, as with Horovod's own allocation. It keeps Horovod's output and, where the wire needs a cast
    (``Compression.fp16``; bfloat16, which Horovod cannot reduce, as float32), the cast copy
    and the result in the buffer's own dtype, filled with ``copy_`` (which rounds exactly as
    ``tensor.type(...)`` does). Any other compressor is called as Horovod calls it, and only
    Horovod's output is kept.
    """

    def __init__(self, compression: Any) -> None:
        self.compression = compression
        self._kept: Dict[Tuple[Any, ...], List[Dict[str, torch.Tensor]]] = {}

    def forget(self) -> None:
        """Drop every kept buffer (after a cancelled round: Horovod may still write one)."""
        self._kept.clear()

    def _cast(self, tensor: torch.Tensor) -> Optional[torch.dtype]:
        """The wire dtype when this class casts ``tensor`` itself, else None."""
        if self.compression is hvd.Compression.fp16 and tensor.dtype in (torch.float32,
                                                                          torch.float64):
            return torch.float16
        if tensor.dtype == torch.bfloat16 and self.compression in (hvd.Compression.none,
                                                                   hvd.Compression.fp16):
            return torch.float32 if self.compression is hvd.Compression.none else torch.float16
        return None

    def _kept_for(self, tensors: Sequence[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        key = tuple((t.dtype, tuple(t.shape), t.device) for t in tensors)
        if key not in self._kept:
            if len(self._kept) >= MAX_KEPT:
                self._kept.clear()
            self._kept[key] = [{} for _ in tensors]
        return self._kept[key]

    def send(self, tensors: Sequence[torch.Tensor]
             ) -> Tuple[List[torch.Tensor], List[torch.Tensor], Tuple[Any, ...]]:
        """``(what Horovod reads, where it writes, contexts)`` for one round."""
        sent, outputs, contexts = [], [], []
        for tensor, kept in zip(tensors, self._kept_for(tensors)):
            dtype = self._cast(tensor)
            known = dtype is not None or self.compression is hvd.Compression.none or (
                self.compression is hvd.Compression.fp16 and tensor.dtype == torch.float16)
            if dtype is not None:
                wire = kept.setdefault("wire", torch.empty_like(tensor, dtype=dtype))
                context: Any = ("cast", kept.setdefault("result", torch.empty_like(tensor)))
                wire.copy_(tensor)
            elif known:
                wire, context = tensor, ("as is", None)
            else:
                wire, ctx = self.compression.compress(tensor)
                context = ("decompress", ctx)
            out = kept.get("out")
            if out is None or out.dtype != wire.dtype or out.shape != wire.shape:
                out = kept["out"] = torch.empty_like(wire)
            sent.append(wire)
            outputs.append(out)
            contexts.append(context)
        return sent, outputs, tuple(contexts)

    def receive(self, outputs: Sequence[torch.Tensor], contexts: Sequence[Any]
                ) -> List[torch.Tensor]:
        """The round's sums, in the round buffers' dtypes."""
        result = []
        for out, (how, value) in zip(outputs, contexts):
            if how == "cast":
                result.append(value.copy_(out))
            elif how == "decompress":
                result.append(self.compression.decompress(out, value))
            else:
                result.append(out)
        return result


def allreduce_into(sent: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], name: str,
                   process_set: Any) -> Any:
    """Start Horovod's grouped sum of ``sent`` into ``outputs`` (kept buffers, not new ones).

    ``hvd.grouped_allreduce_async`` allocates its outputs on every call; this is the function it
    calls with them (Horovod 0.28), looked up at call time so tests can count real calls.
    """
    return mpi_ops._grouped_allreduce_async(list(sent), list(outputs), name, hvd.Sum, 1.0, 1.0,
                                            process_set)


def wait_for_handle(handle: Any, cancelled: Callable[[], bool] = lambda: False) -> Any:
    """``hvd.synchronize(handle)`` without spinning: poll, sleep, back off.

    Raises :class:`RoundCancelled` if ``cancelled()`` turns true first (the handle is then left
    alone: after an elastic reset its number may belong to a new collective).
    """
    delay = MIN_POLL_SLEEP
    while not hvd.poll(handle):
        if cancelled():
            raise RoundCancelled()
        time.sleep(delay)
        delay = min(2 * delay, MAX_POLL_SLEEP)
    if cancelled():
        raise RoundCancelled()
    return hvd.synchronize(handle)


def average_gradients(params: Sequence[torch.Tensor], name: str,
                      process_set: Any = None) -> int:
    """Average the parameters' gradients over ``process_set`` (default: every worker) in one
    grouped allreduce, as synchronous SGD does; return the bytes this worker sent."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0
    handle = hvd.grouped_allreduce_async_(grads, op=hvd.Average, name=name,
                                          process_set=process_set or hvd.global_process_set)
    wait_for_handle(handle)
    return sum(g.numel() * g.element_size() for g in grads)


class Communicator:
    """Sums flat buffers over all workers with one (compressed) grouped allreduce."""

    def __init__(self, compression: Any, name: str, stats: ExchangeStats) -> None:
        self.compression = compression
        self.name = name
        self.stats = stats
        self.process_set = hvd.global_process_set  # hvd_easgd.optim.hierarchy: EASGD among a set
        self.wire = WireBuffers(compression)

    def start(self, tensors: Sequence[torch.Tensor], round_index: int) -> Pending:
        sent, outputs, contexts = self.wire.send(tensors)
        started = time.perf_counter()
        handle = allreduce_into(sent, outputs, f"{self.name}.round{round_index}",
                                self.process_set)
        self._count(sent)
        return Pending(handle, contexts, started)

    def _count(self, sent: Sequence[torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in sent)
        self.stats.allreduce_calls += 1
        self.stats.bytes_communicated += nbytes
        self.stats.cross_group_bytes += nbytes

    def wait(
        self, pending: Pending, cancelled: Callable[[], bool] = lambda: False
    ) -> List[torch.Tensor]:
        outputs = wait_for_handle(pending.handle, cancelled)
        result = self.wire.receive(outputs, pending.contexts)
        self.stats.comm_seconds += time.perf_counter() - pending.started
        return result


class _Round:
    """One round being waited for on its own daemon thread."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.result: Optional[List[torch.Tensor]] = None
        self.error: Optional[BaseException] = None


class BackgroundExchange:
    """Waits for one round at a time on a background thread.

    ``submit`` enqueues the allreduce on the calling (training) thread, so every collective is
    requested in program order, and returns at once. ``collect`` blocks (on an event, not a
    spin) until the round is back and returns its result, re-raising on the calling thread any
    exception the round raised (a lost peer, a Horovod error) with its original traceback.
    ``cancel`` abandons the round in flight without waiting for it.
    """

    def __init__(self, communicator: Communicator) -> None:
        self.communicator = communicator
        self._round: Optional[_Round] = None
        self._closed = False

    @property
    def in_flight(self) -> bool:
        return self._round is not None

    def submit(self, tensors: Sequence[torch.Tensor], round_index: int) -> None:
        if self._closed:
            raise RuntimeError("the optimizer was closed; create a new one to keep training")
        assert self._round is None, "at most one round may be in flight"
        pending = self.communicator.start(tensors, round_index)
        current = _Round()

        def wait() -> None:
            try:
                current.result = self.communicator.wait(pending, current.cancelled.is_set)
            except BaseException as error:  # noqa: BLE001 - handed to the training thread
                current.error = error
            finally:
                current.done.set()

        threading.Thread(target=wait, name="hvd-easgd-exchange", daemon=True).start()
        self._round = current

    def failed(self) -> Optional[BaseException]:
        """The exception of a finished, failed round, without blocking."""
        current = self._round
        if current is not None and current.done.is_set():
            return current.error
        return None

    def collect(self) -> Tuple[List[torch.Tensor], float, bool]:
        """Wait for the round in flight: ``(result, seconds waited, whether it had to wait)``."""
        current, self._round = self._round, None
        assert current is not None, "no round in flight"
        stalled = not current.done.is_set()
        started = time.perf_counter()
        current.done.wait()
        if current.error is not None:
            raise current.error
        assert current.result is not None
        return current.result, time.perf_counter() - started, stalled

    def cancel(self) -> bool:
        """Abandon the round in flight (if any); return whether there was one."""
        current, self._round = self._round, None
        if current is None:
            return False
        current.cancelled.set()
        self.communicator.wire.forget()
        return True

    def close(self, timeout: Optional[float] = None) -> None:
        """Let the round in flight finish (so no peer waits on us), then refuse new rounds."""
        current, self._round = self._round, None
        if current is not None:
            current.done.wait(timeout)
        self._closed = True
