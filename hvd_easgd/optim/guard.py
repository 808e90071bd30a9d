"""The non-finite guard: a round (or synchronous-SGD step) with NaN/inf is applied by nobody.

A NaN/inf contribution makes the round's sum non-finite, which every worker checks before
applying it (:meth:`~hvd_easgd.optim.center.CenterState.round_is_finite`); only then do the
workers allgather one flag each to learn who sent it, so a normal round carries exactly the
parameters. No worker applies the round (the center keeps its last finite value), the bad
workers restart from the center with fresh local optimizer state, rank 0 and the bad ranks
warn, naming them, and ``opt.stats.skipped_rounds`` counts it. When ``nonfinite_patience`` of
the last ``2 * nonfinite_patience`` rounds were skipped, every worker raises
:class:`NonFiniteError`. A window, not a streak: in async mode a worker restarted from the
center sends one good round (the values it was restarted from) between two bad ones, and must
still be stopped.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import torch

from hvd_easgd.optim import collectives
from hvd_easgd.optim.hierarchy import Topology, peer_ranks, peer_set
from hvd_easgd.optim.state import RoundState


class NonFiniteError(RuntimeError):
    """Some worker kept sending NaN/inf parameters: training has diverged there."""


class NonFiniteWarning(RuntimeWarning):
    """A round was skipped because some worker's contribution was NaN/inf."""


def gradients_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether the (averaged, so identical on every worker) gradients hold no NaN/inf."""
    return all(bool(torch.isfinite(p.grad.sum())) for p in params if p.grad is not None)


class NonFiniteGuard:
    """The verdict on each round and synchronous-SGD step of one optimizer.

    Args:
        state: the loop state whose non-finite window and statistics it updates.
        local: the local optimizer, whose state a restarted worker drops.
        patience: ``nonfinite_patience``: bad rounds among the last ``2 * patience`` that stop
            training.
        topology: ``hierarchy=`` / ``process_set=``'s groups (who the peers are), or None.
        name: the prefix of the guard's Horovod collective names.
    """

    def __init__(self, state: RoundState, local: torch.optim.Optimizer, patience: int,
                 topology: Optional[Topology], name: str) -> None:
        self.state = state
        self.local = local
        self.patience = patience
        self.topology = topology
        self.name = name

    @property
    def window(self) -> int:
        """How many recent rounds the verdict looks at."""
        return 2 * self.patience

    def passed(self) -> None:
        """A round or step whose values were finite."""
        self.state.record_verdict(False, self.window)

    def senders(self, slot: int) -> List[int]:
        """Who sent NaN/inf to round ``slot``, whose sum is not finite: ``[-1]`` if nobody did
        (an overflow on the wire). A collective, on this rare path only."""
        members = peer_ranks(self.topology)
        mine = torch.tensor([0 if self.state.center.locally_finite(slot) else 1],
                            dtype=torch.int32)
        flags = collectives.allgather(mine, f"{self.name}.nonfinite", peer_set(self.topology))
        return [members[i] for i in torch.nonzero(flags).flatten().tolist()] or [-1]

    def skip_round(self, slot: int) -> bool:
        """Apply nothing of round ``slot``; restart the workers that sent NaN/inf; raise
        :class:`NonFiniteError` past the patience. Return whether this worker restarted."""
        bad = self.senders(slot)
        count = self.state.record_verdict(True, self.window)
        overflow = bad == [-1]
        ranks = f"rank(s) {', '.join(map(str, bad))}"
        who = "the sum on the wire" if overflow else f"the contribution of {ranks}"
        restarted = self.state.rank in bad
        if restarted:
            self.state.center.live_from_center()
            self.local.state.clear()
        if self.state.rank == 0 or restarted:
            after = "" if overflow else (f"; {ranks} restart from the center with fresh "
                                         f"optimizer state")
            warnings.warn(
                f"EASGD round {self.state.round} (step {self.state.step}): {who} was not "
                f"finite (NaN or inf). No worker applied the round, the center keeps its last "
                f"finite value{after}. Bad rounds among the last {self.window}: {count} of "
                f"{self.patience} allowed.", NonFiniteWarning, stacklevel=4)
        if count >= self.patience:
            fix = ("use compression=hvd.Compression.none (fp16 overflows above 65504) or lower "
                   "the learning rate" if overflow else
                   "lower the learning rate (or add warm-up or gradient clipping) and check "
                   "those workers' data for NaN/inf inputs or labels")
            raise NonFiniteError(
                f"EASGD stopped at step {self.state.step}: "
                f"{'the sum on the wire was' if overflow else ranks + ' sent'} non-finite values "
                f"in {count} of the last {self.window} rounds, even after restarting from the "
                f"center (nonfinite_patience={self.patience}). Training diverges there: {fix}.")
        return restarted

    def skip_sync_sgd_step(self) -> None:
        """A synchronous-SGD step whose averaged gradient is not finite: nobody applies it;
        past the patience every worker raises :class:`NonFiniteError`, as for rounds."""
        count = self.state.record_verdict(True, self.window)
        if self.state.rank == 0:
            warnings.warn(
                f"EASGD step {self.state.step} (synchronous SGD, sync_sgd_steps="
                f"{self.state.sync_sgd_steps}): the averaged gradient was not finite (NaN or "
                f"inf); no worker applied it. Bad steps among the last {self.window}: {count} "
                f"of {self.patience} allowed.", NonFiniteWarning, stacklevel=4)
        if count >= self.patience:
            raise NonFiniteError(
                f"EASGD stopped at step {self.state.step}: the averaged gradient of the "
                f"synchronous-SGD steps was non-finite in {count} of the last {self.window} "
                f"steps (nonfinite_patience={self.patience}). Training diverges: lower the "
                f"learning rate (or add warm-up or gradient clipping) and check the workers' "
                f"data for NaN/inf.")
