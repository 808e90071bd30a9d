"""The life of one communication round: start it, wait for it (or let it fly), apply it.

:class:`~hvd_easgd.ElasticOptimizer` decides *when* a round happens (every ``tau``-th step);
:class:`Rounds` runs it, on the state a round reads and writes
(:class:`~hvd_easgd.optim.state.RoundState`: the center buffers, the counters, the rule):

- **sync** (:meth:`Rounds.sync`): seal ``d = x - c``, start the allreduce, wait for it
  (sleeping, :mod:`hvd_easgd.optim.exchange`), apply it. EASGD's round sends the parameters ``x_t`` at
  which the round step's gradient is taken, and those exist as soon as the step before ends:
  :meth:`Rounds.start_early` starts the allreduce there, so it runs behind the next forward
  and backward (and the local optimizer step) instead of stalling the round step. The
  parameters' math is the same as starting it at the round step; averaged buffers (BatchNorm
  statistics) go one forward pass earlier (see :meth:`Rounds.start_early`).
- **async** (:meth:`Rounds.overlap`): seal this round into the free one of two round buffers
  and hand it to the background exchange; the round started ``tau`` steps ago is applied
  first, at the same point. Training never waits unless a round is still on the wire when
  the next one is due.
- **synchronous SGD** (:meth:`Rounds.sync_sgd_step`, the first ``sync_sgd_steps`` steps): the
  gradients averaged over the peers every step, and the center kept at the identical workers.

A round whose values are not finite is applied by nobody (:mod:`hvd_easgd.optim.guard`). A
round that fails (a peer died, a non-finite streak ran out) is kept in :attr:`Rounds.error`:
every later call raises, naming that cause, until a Horovod Elastic reset clears it.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from hvd_easgd.optim.collectives import Cancelled
from hvd_easgd.optim.exchange import BackgroundExchange, Communicator, Pending, average_gradients
from hvd_easgd.optim.guard import NonFiniteError, NonFiniteGuard, gradients_finite
from hvd_easgd.optim.rules import update_center_average
from hvd_easgd.optim.state import RoundState

Closure = Optional[Callable[[], float]]

#: How long closing waits for the round on the wire (seconds).
CLOSE_TIMEOUT = 60.0


class EditedParametersWarning(UserWarning):
    """Parameters changed between ``step()`` calls while a round started early was on the wire."""


class Rounds:
    """Runs the rounds of one :class:`~hvd_easgd.ElasticOptimizer` (see the module docstring).

    Args:
        state: the center buffers, counters, rule and statistics the rounds read and write.
        local: the local optimizer, stepped at every round step.
        communicator: sums a round over the peers.
        exchange: the background exchange of async mode, ``None`` in sync mode.
        guard: the verdict on rounds and synchronous-SGD steps with NaN/inf.
        peer_set: the process set of EASGD's peers (synchronous SGD averages over it).
        center_average: ``"running"``, ``"moving"`` or None, and ``center_average_rate``.
        start_early: whether sync EASGD rounds may start at the end of the step before theirs.
    """

    def __init__(self, state: RoundState, local: torch.optim.Optimizer,
                 communicator: Communicator, exchange: Optional[BackgroundExchange],
                 guard: NonFiniteGuard, peer_set: object, *, center_average: Optional[str],
                 center_average_rate: float, start_early: bool) -> None:
        self.state = state
        self.local = local
        self.communicator = communicator
        self.exchange = exchange
        self.guard = guard
        self.peer_set = peer_set
        self.center_average = center_average
        self.center_average_rate = center_average_rate
        self.start_early_allowed = start_early
        self.slot_in_flight: Optional[int] = None
        self.error: Optional[BaseException] = None
        #: A sync round started at the end of the step before its own, with the parameters'
        #: version counters at that point (:meth:`start_early`).
        self.early: Optional[Tuple[Pending, Tuple[int, ...]]] = None
        self._warned_edit = False

    def run(self, closure: Closure) -> Optional[float]:
        """The ``tau``-th step: the local step and a round, in the optimizer's mode."""
        if self.exchange is None or self.state.size == 1:
            # A single worker has no communication to hide: a late round would only pull it
            # back toward where it was tau steps ago (alpha = beta with p = 1).
            return self.sync(closure)
        return self.overlap(closure)

    def sync(self, closure: Closure) -> Optional[float]:
        """Start a round, wait for it and apply it, around the local step."""
        if self.early is not None:
            pending = self._take_early()
            loss = self.local.step(closure)
        elif self.state.rule.snapshot_before_step:
            # Sync EASGD: nothing moves the center before this round lands, so its
            # allreduce can run while the local optimizer updates the parameters.
            pending = self._start(0)
            loss = self.local.step(closure)
        else:
            loss = self.local.step(closure)
            pending = self._start(0)
        started = time.perf_counter()
        totals = self.communicator.wait(pending)
        self.state.stats.count_wait(time.perf_counter() - started, stalled=True)
        self.apply(0, totals)
        return loss

    def overlap(self, closure: Closure) -> Optional[float]:
        """Apply the round in flight (if any) and send this one to the background exchange."""
        exchange, center = self.exchange, self.state.center
        assert exchange is not None
        slot = 1 if self.slot_in_flight == 0 else 0
        before = self.state.rule.snapshot_before_step
        if before:
            center.snapshot(slot)
        loss = self.local.step(closure)
        restarted = self.finish() if exchange.in_flight else False
        if restarted or not before:
            # After the previous round landed: a pulling method's difference must not count
            # again the pull the worker has just received (and a worker that has just
            # restarted from the center must not send the values it was restarted from).
            center.snapshot(slot)
        else:
            # Buffers are averaged like a pulling method's parameters whatever the method:
            # send them as they are after the previous round's average has landed.
            for group, views in zip(center.groups, center.round_views[slot]):
                k = group.num_params
                if k < len(group.tensors):
                    torch._foreach_copy_(list(views[k:]), group.tensors[k:])
        exchange.submit(center.rounds[slot], self._seal(slot))
        self.slot_in_flight = slot
        return loss

    def sync_sgd_step(self, closure: Closure, params: List[torch.Tensor]) -> Optional[float]:
        """Synchronous SGD: average the gradients over the peers, step, and keep the center at
        the (identical) workers, so that EASGD starts from them at the switch. A step whose
        averaged gradient is not finite is applied by nobody (the non-finite guard's verdict)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sent = average_gradients(params, f"{self.communicator.name}.sync_sgd", self.peer_set)
        self.state.stats.count_sent(sent, allreduce=False)
        self.state.count_step()
        if gradients_finite(params):
            self.guard.passed()
            self.local.step()
            self.state.center.center_from_live_params()
        else:
            self._guarded(self.guard.skip_sync_sgd_step)
        return loss

    @property
    def starts_early(self) -> bool:
        """Whether sync rounds start at the end of the step before theirs (see below)."""
        return (self.start_early_allowed and self.exchange is None
                and self.state.rule.snapshot_before_step and self.state.size > 1)

    def start_early(self) -> None:
        """At the end of the step before a round step: start that round's allreduce now.

        A sync EASGD round sends ``d = x_t - c``: the parameters at which the round step's
        gradient is taken, against a center that nothing moves in between. Both are final when
        the step before returns, so the allreduce can run behind the next forward and
        backward; the round step then only waits for what is left of it. Same math for the
        parameters and the center, same bytes, same collective order on every worker.

        It applies to sync EASGD/EAMSGD with more than one worker. Averaged buffers (BatchNorm
        running statistics) change in the round step's forward pass, after this point: the
        round sends them as they were when the step before ended, and lands like an async
        round does, keeping the worker's own change since (``b <- b - b_sent + mean_i
        b_sent,i``). Training-mode BatchNorm never reads them, so the parameters stay bit for
        bit the same. Parameters edited in place between the two steps (their version
        counters move) are detected and warned about: that round still sends their values
        from the end of the step before. Edits through ``.data`` escape the version counters;
        construct the optimizer with ``start_early=False`` for code that makes them.
        """
        if self.early is not None or self.error is not None or not self.starts_early:
            return
        center = self.state.center
        center.seal(0, from_live=True)
        pending = self.communicator.start(center.rounds[0], self.state.begin_early_round())
        self.early = (pending, self._versions())

    def _take_early(self) -> Pending:
        assert self.early is not None
        (pending, versions), self.early = self.early, None
        round_index = self.state.take_early_round()
        if versions != self._versions() and not self._warned_edit:
            self._warned_edit = True
            warnings.warn(
                f"EASGD round {round_index}: parameters were changed in place "
                "between step() calls while the round's allreduce (started when the step "
                "before ended) was running; the round used their values from the end of that "
                "step. Make such edits before step() returns, or construct the optimizer with "
                "start_early=False.", EditedParametersWarning, stacklevel=4)
        return pending

    def _versions(self) -> Tuple[int, ...]:
        # The parameters' alone: the forward pass moves the buffers by design.
        return tuple(t._version for g in self.state.center.groups
                     for t in g.tensors[:g.num_params])

    def settle_early(self) -> None:
        """Wait for a round started early and drop its result (its step never came, or the
        values it sent were replaced). Waiting, not abandoning: every worker started it, so
        it completes, and its Horovod name is free again when the round step starts it anew.
        Bounded by :data:`CLOSE_TIMEOUT`."""
        if self.early is None:
            return
        (pending, _), self.early = self.early, None
        deadline = time.monotonic() + CLOSE_TIMEOUT
        try:
            self.communicator.wait(pending, lambda: time.monotonic() > deadline)
        except Cancelled:
            self.communicator.wire.forget()
        finally:
            self.state.drop_round(numbered=False)

    @property
    def in_flight(self) -> bool:
        """Whether a round is on the wire (async mode)."""
        return self.exchange is not None and self.exchange.in_flight

    def finish(self) -> bool:
        """Wait for the round in flight and apply it; return whether this worker restarted."""
        assert self.exchange is not None and self.slot_in_flight is not None
        try:
            totals, waited, stalled = self.exchange.collect()
        except BaseException as error:
            self.error = error
            raise
        finally:
            slot, self.slot_in_flight = self.slot_in_flight, None
        self.state.stats.count_wait(waited, stalled)
        return self.apply(slot, totals)

    @torch.no_grad()
    def apply(self, slot: int, totals: Sequence[torch.Tensor]) -> bool:
        """Apply a round that has landed; return whether this worker restarted instead."""
        state, center = self.state, self.state.center
        if not center.round_is_finite(totals):
            return self._guarded(lambda: self.guard.skip_round(slot))
        self.guard.passed()
        for gi, group in enumerate(center.groups):
            c, diff, total = center.centers[gi], center.rounds[slot][gi], totals[gi]
            n = group.param_numel
            velocity = center.velocity[gi][:n] if center.velocity is not None else None
            scale = state.rule.apply(c[:n], diff[:n], total[:n], velocity) if n else 1.0
            if n < group.numel:
                state.buffer_rule.apply(c[n:group.numel], diff[n:group.numel],
                                        total[n:group.numel])
            group.scatter_add(center.round_views[slot][gi], alpha=scale)
            if center.averages is not None:
                update_center_average(center.averages[gi], c, self.center_average, state.round,
                                      self.center_average_rate)
        return False

    def _guarded(self, verdict: Callable[[], bool]) -> bool:
        """Run the guard's verdict; a :class:`NonFiniteError` it raises fails the rounds."""
        try:
            return verdict()
        except NonFiniteError as error:
            self.error = error
            raise

    def drop_in_flight(self) -> None:
        """Abandon the round on the wire (an elastic reset): nobody applies it."""
        if self.exchange is not None and self.exchange.cancel():
            self.state.drop_round(numbered=True)
        if self.early is not None:  # started early and never numbered
            self.early = None
            self.communicator.wire.forget()
            self.state.drop_round(numbered=False)
        self.slot_in_flight = None

    def reset(self) -> None:
        """After a Horovod Elastic reset or restore: drop the round on the wire, forget failures."""
        self.drop_in_flight()
        self.error = None

    def raise_if_failed(self) -> None:
        """Raise if a round failed: its own exception first, then a pointer to it."""
        if self.error is None and self.exchange is not None and self.exchange.failed():
            self.finish()  # re-raises the round's own exception, here
        if self.error is not None:
            raise RuntimeError(
                "an earlier EASGD round failed (see the cause above); this optimizer cannot "
                "go on. Restart the job, resuming from the last checkpoint (or run it under "
                "hvd.elastic.run, which restores the last commit)."
            ) from self.error

    def close(self, apply_in_flight: bool) -> None:
        """Stop the background exchange, first applying the round in flight if asked to."""
        try:
            if apply_in_flight and self.error is None and self.in_flight:
                self.finish()
            self.settle_early()  # its step never came: no peer is left waiting on it
        finally:
            if self.exchange is not None:
                self.exchange.close(timeout=CLOSE_TIMEOUT)

    def _start(self, slot: int) -> Pending:
        self.state.center.seal(slot, from_live=True)
        return self.communicator.start(self.state.center.rounds[slot], self.state.begin_round())

    def _seal(self, slot: int) -> int:
        """``d = snapshot - center`` against the center this round will be applied to (nothing
        changes the center in between); number the round and return its number."""
        self.state.center.seal(slot)
        return self.state.begin_round()
