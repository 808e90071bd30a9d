"""Communication: one fused Horovod allreduce per round, waited for politely.

:class:`Communicator` sums a list of flat buffers (one per dtype/device) over all workers with a
single grouped Horovod allreduce, optionally compressed on the wire (the center itself never
is). The caller's thread only enqueues the request; Horovod's own background thread moves
the bytes.

Nothing is allocated per round: a fresh parameter-sized output would cost a page fault per
page and an ``munmap`` when freed, every round. :class:`WireBuffers` therefore keeps Horovod's
output and, for fp16 compression and bfloat16 buffers, the cast copies there and back, and hands
them to Horovod's own out-of-place allreduce.

Waiting never spins (:func:`hvd_easgd.optim.collectives.wait`), and stops early when the round
is cancelled.

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

import torch

from hvd_easgd.optim import collectives
from hvd_easgd.optim.collectives import Compression


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

    def count_step(self) -> None:
        self.steps += 1

    def count_round(self) -> None:
        """A round handed to the wire."""
        self.rounds += 1

    def count_sent(self, nbytes: int, *, allreduce: bool) -> None:
        """Bytes this worker handed to a collective spanning groups (``allreduce``: a round's)."""
        self.allreduce_calls += int(allreduce)
        self.bytes_communicated += nbytes
        self.cross_group_bytes += nbytes

    def count_group_bytes(self, nbytes: int) -> None:
        """Bytes handed to a collective inside this worker's group (``hierarchy=``)."""
        self.group_bytes += nbytes

    def count_comm(self, seconds: float) -> None:
        """A round's time from being handed to Horovod until its result is back."""
        self.comm_seconds += seconds

    def count_wait(self, seconds: float, stalled: bool) -> None:
        """Time the training thread was blocked on a round, and whether it had to wait at all."""
        self.wait_seconds += seconds
        self.stalls += int(stalled)

    def count_skipped(self) -> None:
        self.skipped_rounds += 1

    def count_dropped(self) -> None:
        self.dropped_rounds += 1

    def count_reset(self) -> None:
        self.resets += 1


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
        if self.compression is Compression.fp16 and tensor.dtype in (torch.float32,
                                                                          torch.float64):
            return torch.float16
        if tensor.dtype == torch.bfloat16 and self.compression in (Compression.none, Compression.fp16):
            return torch.float32 if self.compression is Compression.none else torch.float16
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
            known = dtype is not None or self.compression is Compression.none or (
                self.compression is Compression.fp16 and tensor.dtype == torch.float16)
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


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def average_gradients(params: Sequence[torch.Tensor], name: str,
                      process_set: Any = None) -> int:
    """Average the parameters' gradients over ``process_set`` (default: every worker) in one
    grouped allreduce, as synchronous SGD does; return the bytes this worker sent."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0
    collectives.wait(collectives.average_async_(grads, name,
                                                process_set or collectives.GLOBAL_SET))
    return nbytes(grads)


class Communicator:
    """Sums flat buffers over all workers with one (compressed) grouped allreduce."""

    def __init__(self, compression: Any, name: str, stats: ExchangeStats,
                 process_set: Any = collectives.GLOBAL_SET) -> None:
        self.compression = compression
        self.name = name
        self.stats = stats
        self.process_set = process_set  # hvd_easgd.optim.hierarchy: EASGD among a set's members
        self.wire = WireBuffers(compression)

    def start(self, tensors: Sequence[torch.Tensor], round_index: int) -> Pending:
        sent, outputs, contexts = self.wire.send(tensors)
        started = time.perf_counter()
        handle = collectives.sum_into_async(sent, outputs, f"{self.name}.round{round_index}",
                                            self.process_set)
        self.stats.count_sent(nbytes(sent), allreduce=True)
        return Pending(handle, contexts, started)

    def wait(
        self, pending: Pending, cancelled: Callable[[], bool] = lambda: False
    ) -> List[torch.Tensor]:
        outputs = collectives.wait(pending.handle, cancelled)
        result = self.wire.receive(outputs, pending.contexts)
        self.stats.count_comm(time.perf_counter() - pending.started)
        return result


class _Round:
    """One round being waited for on its own daemon thread."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.result: Optional[List[torch.Tensor]] = None
        self.error: Optional[BaseException] = None

    def wait(self, communicator: "Communicator", pending: Pending) -> None:
        """Wait for ``pending`` (on the round's own thread), keeping its result or its error."""
        try:
            self.result = communicator.wait(pending, self.cancelled.is_set)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread
            self.error = error
        finally:
            self.done.set()


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
        threading.Thread(target=current.wait, args=(self.communicator, pending),
                         name="hvd-easgd-exchange", daemon=True).start()
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
