"""Horovod Elastic: membership changes with the center intact.

Importing :mod:`hvd_easgd` registers :class:`ElasticOptimizerStateHandler` with
``hvd.elastic.TorchState``, so Horovod's own elastic scripts work unchanged apart from the
one-line optimizer swap::

    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0, batch=0)
    train(state)   # decorated with @hvd.elastic.run; calls state.commit() now and then

What each of Horovod's events does to the optimizer:

- ``state.commit()`` (``save``): copies the live parameters, the center (and velocity/average),
  the local optimizer's state, the outer optimizer's state (``outer_optimizer``, DiLoCo) and
  the step/round counters into host memory (:class:`~hvd_easgd.optim.center.Commit`), into the
  previous commit's buffers: about 3x the parameter bytes for EASGD with momentum, on top of
  Horovod's own copy of the model, so commit every few dozen steps when the model is large.
  A round on the wire is not waited for: the commit is the state before it.
- a lost worker (``HorovodInternalError``, then ``restore``): the round in flight is abandoned
  on every worker (its thread stops at its next poll and nothing joins it), and everything in
  the last commit comes back together.
- after every reset (``sync``, a collective, :func:`sync_workers`): alpha and every rule follow
  the new ``hvd.size()``; one allgather checks that all workers run the same model and settings
  and finds the survivors; the lowest-ranked survivor broadcasts its committed center and
  counters, so the replicas are bit-identical again. A worker that joins starts from that
  center with a fresh local optimizer. A survivor keeps its local optimizer state and, by
  default (``survivors="own"``), its own committed parameters: restarting it from the center
  would throw away the local progress the center has not caught up with yet. With one worker
  left the center then follows it (:func:`hvd_easgd.optim.checks.resolve_coefficients`).
- hosts removed without a failure (Horovod skips the sync, :func:`follow_world`): the next
  round sees the new size, drops the round in flight (every worker committed at the same step,
  so all drop the same one) and re-derives alpha; the centers were identical already.

Under an elastic launch (``HOROVOD_ELASTIC=1``) the constructor makes no collective call (a
joining worker would deadlock against the others' sync); the first sync does the consistency
check and the broadcast, and ``step()`` before it raises :data:`NOT_SYNCED`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from hvd_easgd.optim import collectives
from hvd_easgd.optim.center import Commit, restore_commit, restore_live, take_commit
from hvd_easgd.optim.checks import check_signatures
from hvd_easgd.optim.guard import NonFiniteError, NonFiniteWarning  # noqa: F401 - old imports
from hvd_easgd.optim.rounds import Rounds
from hvd_easgd.optim.state import RoundState

NOT_SYNCED = (
    "this job was started by an elastic horovodrun (HOROVOD_ELASTIC=1) and the optimizer has "
    "not been synced yet: train inside a function decorated with @hvd.elastic.run and pass "
    "hvd.elastic.TorchState(model=model, optimizer=optimizer, ...) to it; its first sync "
    "broadcasts the center and starts every worker from it"
)

SURVIVORS = ("own", "center")


def elastic_launch() -> bool:
    """Whether this process was started by an elastic ``horovodrun`` (``--min-np`` etc.)."""
    return os.environ.get("HOROVOD_ELASTIC", "0") == "1"


def check_survivors(survivors: str) -> str:
    if survivors not in SURVIVORS:
        raise ValueError(f"survivors must be one of {', '.join(map(repr, SURVIVORS))} (what the "
                         f"workers that stay through an elastic reset train on), got {survivors!r}")
    return survivors


def follow_world(state: RoundState, rounds: Rounds) -> None:
    """Notice a reset that Horovod did not sync (hosts only removed): re-derive alpha & co."""
    if state.world_changed():
        rounds.drop_in_flight()
        state.configure_world()
        state.stats.count_reset()


def sync_workers(opt: Any, committed: Optional[Commit] = None) -> None:
    """Bring every worker to one agreed state after ``hvd.elastic`` (re)started the job.

    ``opt`` is an :class:`~hvd_easgd.ElasticOptimizer`. Collective: every worker calls it (from
    ``TorchState.sync``). Every worker takes the center, counters and switch point to EASGD of
    the lowest-ranked survivor (a worker that has trained in this job before). A joiner starts
    from that center with a fresh local optimizer; a survivor keeps its local optimizer state
    and, with ``survivors="own"``, the parameters of its last commit, ``committed`` (Horovod's
    model handler has just overwritten them with rank 0's). Before the switch to EASGD every
    worker starts from the center: synchronous SGD needs them equal.
    """
    state: RoundState = opt.round_state
    center, name = state.center, opt.communicator.name
    opt.rounds.reset()
    state.configure_world()
    survivor = state.synced
    mine = (survivor, opt.signature() if opt.check_consistency else None)
    everyone = collectives.allgather_object(mine, name=f"{name}.sync.who")
    if opt.check_consistency:
        check_signatures([sig for _, sig in everyone])
    root = next((r for r, (alive, _) in enumerate(everyone) if alive), 0)
    if state.in_sync_sgd:
        center.reset_from_live()  # synchronous SGD: the center is the workers' value
    for index, tensor in enumerate(center.tensors()):
        collectives.broadcast_(tensor, root, f"{name}.sync.{index}")
    agreed = collectives.broadcast_object(state.loop_state(), root, f"{name}.sync.counters")
    if center.outer is not None:  # the outer optimizer's momentum is part of the center
        center.outer.load_state_dict(collectives.broadcast_object(
            center.outer.state_dict(), root, f"{name}.sync.outer"))
    state.agreed(*agreed)
    if survivor and opt.survivors == "own" and not state.in_sync_sgd and committed is not None:
        restore_live(center, committed)
    else:
        center.live_from_center()
    if survivor:
        state.stats.count_reset()
    else:
        opt.optimizer.state.clear()


def _handler_class() -> type:
    class ElasticOptimizerStateHandler(collectives.state_handler_base()):
        """``hvd.elastic.TorchState``'s handler for an :class:`~hvd_easgd.ElasticOptimizer`.

        Replaces Horovod's ``OptimizerStateHandler``, whose ``sync`` would broadcast rank 0's
        *local* optimizer state to everyone and whose commit would wait for the round in flight.
        """

        def __init__(self, optimizer: Any) -> None:
            super().__init__(optimizer)
            self._saved: Optional[Commit] = None
            self.save()

        def save(self) -> None:
            state: RoundState = self.value.round_state
            self._saved = take_commit(state.center, self.value.optimizer, state.counters,
                                      reuse=self._saved)

        def restore(self) -> None:
            opt = self.value
            opt.rounds.reset()
            assert self._saved is not None
            state: RoundState = opt.round_state
            state.restore_counters(restore_commit(state.center, opt.optimizer, self._saved))

        def sync(self) -> None:
            sync_workers(self.value, self._saved)
            self.save()

    return ElasticOptimizerStateHandler


def register_state_handler(optimizer_class: type) -> None:
    """Make ``hvd.elastic.TorchState`` handle ``optimizer_class`` with our handler (idempotent)."""
    collectives.register_state_handler(optimizer_class, _handler_class())
