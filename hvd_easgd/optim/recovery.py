"""Faults: Horovod Elastic membership changes and non-finite workers, with the center intact.

**Horovod Elastic.** Importing :mod:`hvd_easgd` registers :class:`ElasticOptimizerStateHandler`
with ``hvd.elastic.TorchState``, so Horovod's own elastic scripts work unchanged apart from the
one-line optimizer swap::

    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0, batch=0)
    train(state)   # decorated with @hvd.elastic.run; calls state.commit() now and then

What each of Horovod's events does to the optimizer:

- ``state.commit()`` (``save``): copies the live parameters, the center (and velocity/average),
  the local optimizer's state, the outer optimizer's state (``outer_optimizer``, DiLoCo) and
  the step/round counters into host memory (:class:`Commit`).
  A round on the wire is not waited for: the commit is the state before it.
- a lost worker (``HorovodInternalError``, then ``restore``): the round in flight is abandoned
  on every worker (its thread stops at its next poll and nothing joins it), and everything in
  the last commit comes back together.
- after every reset (``sync``, a collective): alpha and every rule follow the
  new ``hvd.size()``; one allgather checks that all workers run the same model and settings and
  finds the survivors; the lowest-ranked survivor broadcasts its committed center and counters,
  so the replicas are bit-identical again. A worker that joins starts from that center with a
  fresh local optimizer. A survivor keeps its local optimizer state and, by default
  (``survivors="own"``), its own committed parameters: restarting it from the center would
  throw away the local progress the center has not caught up with yet. With one worker left
  the center then follows it (:func:`hvd_easgd.optim.checks.resolve_coefficients`).
- hosts removed without a failure (Horovod skips the sync): the next round sees the new size,
  drops the round in flight (every worker committed at the same step, so all drop the same
  one) and re-derives alpha; the centers were identical already.

Under an elastic launch (``HOROVOD_ELASTIC=1``) the constructor makes no collective call (a
joining worker would deadlock against the others' sync); the first sync does the consistency
check and the broadcast, and ``step()`` before it raises.

What a commit costs: a copy of the parameters (and averaged buffers), of the center and of the
velocity or average when kept, and of the local optimizer's state, into the previous commit's
buffers: about 3x the parameter bytes for EASGD with momentum, on top of Horovod's own deep copy
of the model (``benchmarks/commit_cost.py``: 0.21 and 0.48 of a training step on a 25 M-parameter
MLP). Commit every few dozen steps, not every step, when the model is large.

**Non-finite workers.** A NaN/inf contribution makes the round's sum non-finite, which every
worker checks before applying it (:meth:`CenterState.round_is_finite`); only then do the
workers allgather one flag each to learn who sent it. No worker applies the round (the center
keeps its last finite value), the bad workers restart from the center with fresh local
optimizer state, rank 0 and the bad ranks warn, naming them, and
``opt.stats.skipped_rounds`` counts it. When ``nonfinite_patience`` of the last
``2 * nonfinite_patience`` rounds were skipped, every worker raises :class:`NonFiniteError`. A
window, not a streak: in async mode a worker restarted from the center sends one good round
(the values it was restarted from) between two bad ones, and must still be stopped.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, List, Optional

import horovod.torch as hvd
import torch

from hvd_easgd.optim.center import Commit, Counters, restore_commit, restore_live, take_commit
from hvd_easgd.optim.checks import check_signatures

if TYPE_CHECKING:
    from hvd_easgd.optim.optimizer import ElasticOptimizer

NOT_SYNCED = (
    "this job was started by an elastic horovodrun (HOROVOD_ELASTIC=1) and the optimizer has "
    "not been synced yet: train inside a function decorated with @hvd.elastic.run and pass "
    "hvd.elastic.TorchState(model=model, optimizer=optimizer, ...) to it; its first sync "
    "broadcasts the center and starts every worker from it"
)


class NonFiniteError(RuntimeError):
    """Some worker kept sending NaN/inf parameters: training has diverged there."""


class NonFiniteWarning(RuntimeWarning):
    """A round was skipped because some worker's contribution was NaN/inf."""


def elastic_launch() -> bool:
    """Whether this process was started by an elastic ``horovodrun`` (``--min-np`` etc.)."""
    return os.environ.get("HOROVOD_ELASTIC", "0") == "1"


def check_everyone(opt: "ElasticOptimizer") -> None:
    """Raise on every worker if the workers' models or EASGD settings differ."""
    check_signatures(hvd.allgather_object(opt.signature(), name=f"{opt.communicator.name}.check"))


# ---------------------------------------------------------------------- non-finite rounds


def nonfinite_ranks(opt: "ElasticOptimizer", slot: int) -> List[int]:
    """Who sent NaN/inf to a round whose sum is not finite: ``[-1]`` if nobody did.

    A collective, but only on this rare path (every worker sees the same non-finite sum), so
    a normal round carries exactly the parameters.
    """
    topology = opt.topology
    members = list(range(hvd.size())) if topology is None else topology.ranks
    mine = torch.tensor([0 if opt.buffers.locally_finite(slot) else 1], dtype=torch.int32)
    flags = hvd.allgather(mine, name=f"{opt.communicator.name}.nonfinite",
                          process_set=opt.topology_peers())
    return [members[i] for i in torch.nonzero(flags).flatten().tolist()] or [-1]


SURVIVORS = ("own", "center")


def check_survivors(survivors: str) -> str:
    if survivors not in SURVIVORS:
        raise ValueError(f"survivors must be one of {', '.join(map(repr, SURVIVORS))} (what the "
                         f"workers that stay through an elastic reset train on), got {survivors!r}")
    return survivors


def window(patience: int) -> int:
    """How many recent rounds the non-finite verdict looks at."""
    return 2 * patience


def skip_round(opt: "ElasticOptimizer", bad: List[int]) -> bool:
    """Apply nothing of this round; restart the bad workers; raise past the patience.

    ``bad`` lists the ranks whose contribution was not finite, or is ``[-1]`` when every
    contribution was finite but their sum was not (an overflow of a lossy wire format).
    Returns whether this worker restarted from the center.
    """
    opt.stats.skipped_rounds += 1
    patience = opt.nonfinite_patience
    count = opt.counters.record_round(True, window(patience))
    rank = opt.world[1]
    overflow = bad == [-1]
    ranks = f"rank(s) {', '.join(map(str, bad))}"
    who = "the sum on the wire" if overflow else f"the contribution of {ranks}"
    restarted = rank in bad
    if restarted:
        opt.buffers.live_from_center()
        opt.optimizer.state.clear()
    if rank == 0 or restarted:
        after = "" if overflow else f"; {ranks} restart from the center with fresh optimizer state"
        warnings.warn(
            f"EASGD round {opt.counters.round} (step {opt.counters.step}): {who} was not "
            f"finite (NaN or inf). No worker applied the round, the center keeps its last finite "
            f"value{after}. Bad rounds among the last {window(patience)}: {count} of {patience} "
            f"allowed.",
            NonFiniteWarning, stacklevel=4,
        )
    if count >= patience:
        fix = ("use compression=hvd.Compression.none (fp16 overflows above 65504) or lower the "
               "learning rate" if overflow else
               "lower the learning rate (or add warm-up or gradient clipping) and check those "
               "workers' data for NaN/inf inputs or labels")
        error = NonFiniteError(
            f"EASGD stopped at step {opt.counters.step}: "
            f"{'the sum on the wire was' if overflow else ranks + ' sent'} non-finite values in "
            f"{count} of the last {window(patience)} rounds, even after restarting from the "
            f"center (nonfinite_patience={patience}). Training diverges there: {fix}."
        )
        opt.rounds.error = error
        raise error
    return restarted


def gradients_finite(params: List[torch.Tensor]) -> bool:
    """Whether the (averaged, so identical on every worker) gradients hold no NaN/inf."""
    return all(bool(torch.isfinite(p.grad.sum())) for p in params if p.grad is not None)


def skip_sync_sgd_step(opt: "ElasticOptimizer") -> None:
    """A synchronous-SGD step (before EASGD starts) whose averaged gradient is not finite:
    nobody applies it; past the patience every worker raises, as for rounds."""
    opt.stats.skipped_rounds += 1
    patience = opt.nonfinite_patience
    count = opt.counters.record_round(True, window(patience))
    if opt.world[1] == 0:
        warnings.warn(
            f"EASGD step {opt.counters.step} (synchronous SGD, sync_sgd_steps="
            f"{opt.sync_sgd_steps}): the averaged gradient was not finite (NaN or inf); no worker "
            f"applied it. Bad steps among the last {window(patience)}: {count} of {patience} "
            f"allowed.", NonFiniteWarning, stacklevel=4)
    if count >= patience:
        error = NonFiniteError(
            f"EASGD stopped at step {opt.counters.step}: the averaged gradient of the "
            f"synchronous-SGD steps was non-finite in {count} of the last {window(patience)} "
            f"steps (nonfinite_patience={patience}). Training diverges: lower the learning rate "
            f"(or add warm-up or gradient clipping) and check the workers' data for NaN/inf.")
        opt.rounds.error = error
        raise error


# ---------------------------------------------------------------------- Horovod Elastic


def follow_world(opt: "ElasticOptimizer") -> None:
    """Notice a reset that Horovod did not sync (hosts only removed): re-derive alpha & co."""
    if (hvd.size(), hvd.rank()) != opt.world:
        opt.rounds.drop_in_flight()
        opt._configure_world()
        opt.stats.resets += 1


def sync_workers(opt: "ElasticOptimizer", committed: Optional[Commit] = None) -> None:
    """Bring every worker to one agreed state after ``hvd.elastic`` (re)started the job.

    Collective: every worker calls it (from ``TorchState.sync``). Every worker takes the
    center, counters and switch point to EASGD of the lowest-ranked survivor (a worker that has
    trained in this job before). A joiner starts from that center with a fresh local optimizer;
    a survivor keeps its local optimizer state and, with ``survivors="own"``, the parameters
    of its last commit, ``committed`` (Horovod's model handler has just overwritten them with
    rank 0's). Before the switch to EASGD every worker starts from the center: synchronous SGD needs
    them equal.
    """
    opt.rounds.reset()
    opt._configure_world()
    survivor = opt.synced
    mine = (survivor, opt.signature() if opt.check_consistency else None)
    everyone = hvd.allgather_object(mine, name=f"{opt.communicator.name}.sync.who")
    if opt.check_consistency:
        check_signatures([sig for _, sig in everyone])
    root = next((r for r, (alive, _) in enumerate(everyone) if alive), 0)
    if opt.in_sync_sgd:
        opt.buffers.reset_from_live()  # synchronous SGD: the center is the workers' value
    for index, tensor in enumerate(opt.buffers.tensors()):
        hvd.broadcast_(tensor, root_rank=root, name=f"{opt.communicator.name}.sync.{index}")
    step, rounds, opt.sync_sgd_steps = hvd.broadcast_object(
        (opt.counters.step, opt.counters.round, opt.sync_sgd_steps), root_rank=root,
        name=f"{opt.communicator.name}.sync.counters",
    )
    if opt.buffers.outer is not None:  # the outer optimizer's momentum is part of the center
        outer = opt.buffers.outer
        outer.load_state_dict(hvd.broadcast_object(
            outer.state_dict(), root_rank=root, name=f"{opt.communicator.name}.sync.outer"))
    opt.counters = Counters(step=int(step), round=int(rounds))
    if survivor and opt.survivors == "own" and not opt.in_sync_sgd and committed is not None:
        restore_live(opt.buffers, committed)
    else:
        opt.buffers.live_from_center()
    if survivor:
        opt.stats.resets += 1
    else:
        opt.optimizer.state.clear()
    opt.synced = True


def _handler_class():
    from horovod.torch.elastic.state import StateHandler

    class ElasticOptimizerStateHandler(StateHandler):
        """``hvd.elastic.TorchState``'s handler for an :class:`ElasticOptimizer`.

        Replaces Horovod's ``OptimizerStateHandler``, whose ``sync`` would broadcast rank 0's
        *local* optimizer state to everyone and whose commit would wait for the round in flight.
        """

        def __init__(self, optimizer: "ElasticOptimizer") -> None:
            super().__init__(optimizer)
            self._saved: Optional[Commit] = None
            self.save()

        def save(self) -> None:
            opt = self.value
            self._saved = take_commit(opt.buffers, opt.optimizer, opt.counters, reuse=self._saved)

        def restore(self) -> None:
            opt = self.value
            opt.rounds.reset()
            assert self._saved is not None
            opt.counters = restore_commit(opt.buffers, opt.optimizer, self._saved)
            opt._link()

        def sync(self) -> None:
            sync_workers(self.value, self._saved)
            self.save()

    return ElasticOptimizerStateHandler


def register_state_handler(optimizer_class: type) -> None:
    """Make ``hvd.elastic.TorchState`` handle ``optimizer_class`` with our handler (idempotent)."""
    from horovod.torch.elastic import state as hvd_state

    registry = list(hvd_state.get_handler_registry())
    if any(kind is optimizer_class for kind, _ in registry):
        return
    hvd_state.set_handler_registry([(optimizer_class, _handler_class())] + registry)
