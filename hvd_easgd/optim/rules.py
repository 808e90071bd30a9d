"""The update rules of EASGD and its baselines, on flat tensors.

No Horovod and no optimizer here: every rule is a few vectorised in-place tensor ops on the
flat buffers of one dtype/device group, so the math can be read (and tested) on its own.

All rules share one shape. At a communication round each worker contributes its *difference*
``d = snapshot - center`` and receives ``total = sum over workers of d``. Exchanging differences
rather than parameters keeps the reduced values small, which matters when the wire format is
fp16, and ``sum_i alpha * (x_i - c)`` is exactly the paper's symmetric elastic force.

- ``easgd`` (eqs. 5-6, Algorithm 1; EAMSGD when the local optimizer uses Nesterov momentum):
  the snapshot ``y`` is taken *before* the local update (where the gradient was taken);
  ``x <- x - alpha * d`` and ``c <- c + alpha * total`` (= ``c + beta * (mean_i y_i - c)``).
- ``downpour``: the snapshot is taken after the local update; the center adds every worker's
  accumulated update, ``c <- c + total``, and every worker restarts from the new center.
- ``mdownpour``: DOWNPOUR with Nesterov momentum ``m`` on the master:
  ``v <- m * v + total``, ``c <- c + total + m * v``.
- ``average`` (periodic model averaging, "local SGD"): ``c <- c + total / p`` (= ``mean_i x_i``)
  and every worker restarts from it.
- ``diloco``: like ``average``, but the center takes one step of an outer optimizer on the
  outer gradient ``-total / p``; that rule is :class:`hvd_easgd.optim.outer.OuterRule`, not this one.

The pulling methods restart a worker from the center by adding ``delta_c - d`` to its current
parameters. In async mode their snapshot is taken after the previous round has landed, so ``d``
never counts again a pull the worker already received. In sync mode the parameters still equal the snapshot, so this lands exactly on the
new center; in async mode (correction applied ``tau`` steps late) it keeps the local progress
made since the snapshot instead of throwing it away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

METHODS = ("easgd", "downpour", "mdownpour", "average", "diloco")
CENTER_AVERAGES = ("running", "moving")


@dataclass(frozen=True)
class ElasticRule:
    """One method's round update.

    ``alpha`` pulls the worker (``x -= alpha * d``); EASGD's center moves by ``beta`` toward the
    workers' mean (``c += beta / p * total``). ``beta`` defaults to ``p * alpha``, the paper's
    symmetric force; :func:`hvd_easgd.optim.checks.resolve_coefficients` gives a lone worker
    ``alpha = 0, beta = 1`` (the center follows it and plain SGD is left).
    """

    method: str
    alpha: float
    world_size: int
    master_momentum: float = 0.0
    beta: Optional[float] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "diloco":
            raise ValueError("diloco's center moves by an outer optimizer: use "
                             "hvd_easgd.optim.outer.OuterRule")

    @property
    def snapshot_before_step(self) -> bool:
        """EASGD pulls with the point where the gradient was taken; the others with the result."""
        return self.method == "easgd"

    @property
    def needs_velocity(self) -> bool:
        return self.method == "mdownpour"

    @torch.no_grad()
    def apply(
        self,
        center: torch.Tensor,
        diff: torch.Tensor,
        total: torch.Tensor,
        velocity: Optional[torch.Tensor] = None,
    ) -> float:
        """Apply one round in place; return the scale ``s`` of the worker's correction.

        ``center`` is this worker's replica of the center and is updated. ``diff`` holds this
        worker's ``d``; on return the worker must add ``s * diff`` to its parameters (``diff``
        may have been overwritten for that). ``total`` (the sum of every worker's ``d``) may be
        overwritten. EASGD's correction is ``-alpha * d``: returned as a scale, it costs no
        pass over the buffer.
        """
        if self.method == "easgd":
            beta = self.alpha * self.world_size if self.beta is None else self.beta
            center.add_(total, alpha=beta / self.world_size)
            return -self.alpha
        if self.method == "average":
            total.div_(self.world_size)
        elif self.method == "mdownpour":
            assert velocity is not None, "mdownpour keeps a master velocity buffer"
            velocity.mul_(self.master_momentum).add_(total)
            total.add_(velocity, alpha=self.master_momentum)
        center.add_(total)  # `total` now holds the center's change
        torch.sub(total, diff, out=diff)
        return 1.0


#: Buffers (BatchNorm statistics and the like) are averaged, whatever the method.
def buffer_rule(world_size: int) -> ElasticRule:
    return ElasticRule("average", alpha=1.0 / world_size, world_size=world_size)


@torch.no_grad()
def update_center_average(
    average: torch.Tensor, center: torch.Tensor, kind: str, rounds: int, rate: float
) -> None:
    """Fold the center after round ``rounds`` (1-based) into its running or moving average.

    ``running`` is ADOWNPOUR's ``1/(t+1)`` average of the centers ``c_0 .. c_t``; ``moving`` is
    MVADOWNPOUR/MVASGD's exponential moving average with constant ``rate``. Both need no
    communication: every worker folds the same bit-identical center.
    """
    weight = 1.0 / (rounds + 1) if kind == "running" else rate
    average.lerp_(center, weight)
