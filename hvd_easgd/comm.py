"""Communication: one fused Horovod allreduce per round, in the foreground or on a thread.

:class:`Communicator` sums a list of flat buffers (one per dtype/device) over all workers with a
single ``hvd.grouped_allreduce_async`` call, optionally compressed on the wire (the center itself
never is). :class:`BackgroundExchange` runs that call on one background thread so training goes
on while the round is on the wire; Horovod's ``synchronize`` releases the GIL while it waits.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, List, Optional, Sequence, Tuple

import horovod.torch as hvd
import torch


@dataclass
class ExchangeStats:
    """Counters an :class:`~hvd_easgd.ElasticOptimizer` exposes as ``opt.stats``.

    ``comm_seconds`` is the time a round spends from being handed to Horovod until its result
    is back (on whichever thread waits for it); ``wait_seconds`` is the time the *training*
    thread is blocked on rounds. In sync mode the two are about equal and every round stalls
    training; in async mode ``wait_seconds`` only grows, and ``stalls`` only counts, when a round
    is still on the wire at the next round step (or at ``synchronize()``).
    """

    steps: int = 0
    rounds: int = 0
    allreduce_calls: int = 0
    bytes_communicated: int = 0
    comm_seconds: float = 0.0
    wait_seconds: float = 0.0
    stalls: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Pending:
    """A round handed to Horovod and not yet collected."""

    handle: Any
    contexts: Tuple[Any, ...]
    started: float


class Communicator:
    """Sums flat buffers over all workers with one (compressed) grouped allreduce."""

    def __init__(self, compression: Any, name: str, stats: ExchangeStats) -> None:
        self.compression = compression
        self.name = name
        self.stats = stats

    def start(self, tensors: Sequence[torch.Tensor], round_index: int) -> Pending:
        compressed, contexts = zip(*(self.compression.compress(t) for t in tensors))
        started = time.perf_counter()
        # Looked up on the module at call time, so tests can count real collective calls.
        handle = hvd.grouped_allreduce_async(
            list(compressed), op=hvd.Sum, name=f"{self.name}.round{round_index}"
        )
        self.stats.allreduce_calls += 1
        self.stats.bytes_communicated += sum(t.numel() * t.element_size() for t in compressed)
        return Pending(handle, tuple(contexts), started)

    def wait(self, pending: Pending) -> List[torch.Tensor]:
        outputs = hvd.synchronize(pending.handle)
        result = [self.compression.decompress(o, c) for o, c in zip(outputs, pending.contexts)]
        self.stats.comm_seconds += time.perf_counter() - pending.started
        return result

    def exchange(self, tensors: Sequence[torch.Tensor], round_index: int) -> List[torch.Tensor]:
        return self.wait(self.start(tensors, round_index))


class BackgroundExchange:
    """Runs :meth:`Communicator.exchange` on one background thread, one round at a time.

    ``submit`` returns at once. ``collect`` blocks until the round is back and returns its
    result, re-raising on the calling thread any exception the round raised (a lost peer, a
    Horovod error) with its original type and traceback.
    """

    def __init__(self, communicator: Communicator) -> None:
        self.communicator = communicator
        self._executor: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hvd-easgd-exchange"
        )
        self._future: Optional[Future] = None

    @property
    def in_flight(self) -> bool:
        return self._future is not None

    def submit(self, tensors: Sequence[torch.Tensor], round_index: int) -> None:
        if self._executor is None:
            raise RuntimeError("the optimizer was closed; create a new one to keep training")
        assert self._future is None, "at most one round may be in flight"
        self._future = self._executor.submit(self.communicator.exchange, list(tensors), round_index)

    def failed(self) -> Optional[BaseException]:
        """The exception of a finished, failed round, without blocking."""
        future = self._future
        if future is not None and future.done():
            return future.exception()
        return None

    def collect(self) -> Tuple[List[torch.Tensor], float, bool]:
        """Wait for the round in flight: ``(result, seconds waited, whether it had to wait)``."""
        future, self._future = self._future, None
        assert future is not None, "no round in flight"
        stalled = not future.done()
        started = time.perf_counter()
        result = future.result()
        return result, time.perf_counter() - started, stalled

    def close(self) -> None:
        """Let the round in flight finish (so no peer waits on us), then stop the thread."""
        future, self._future = self._future, None
        if future is not None:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - already surfaced, or the process is exiting
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
