"""The center's update as an *outer optimizer*: DiLoCo and its relatives.

EASGD moves the center by ``c <- c + beta * (mean_i x_i - c)``: one step of plain SGD, with
learning rate beta, on the *outer gradient* ``g = c - mean_i x_i``. Any ``torch.optim``
optimizer can take that step instead. DiLoCo (Douillard et al., 2023, "DiLoCo: Distributed
Low-Communication Training of Language Models") is exactly this exchange with an inner AdamW,
an outer Nesterov SGD (lr 0.7, momentum 0.9) and workers that restart from the new center.

The round is the same single allreduce of ``d_i = x_i - c`` as every other method; with
``total = sum_i d_i`` the outer gradient is ``g = -total / p``. :class:`OuterRule` has the
interface of :class:`~hvd_easgd.optim.rules.ElasticRule`, so the optimizer's round code is shared:

- ``method="easgd"`` with an ``outer_optimizer``: the center takes the outer optimizer's step;
  the workers keep EASGD's elastic pull ``x_i <- x_i - alpha * (y_i - c)`` (``y_i`` snapshot
  before the local step, as in the paper). With ``SGD(lr=beta)`` this is EASGD up to rounding.
- ``method="diloco"``: snapshot after the local step; the center takes the outer step and
  every worker restarts from the new center (in async mode it keeps the progress made since
  its snapshot, like the other pulling methods).

The outer optimizer is built by a *factory* (``lambda params: torch.optim.SGD(params, ...)``)
because its parameters are the center's tensors, which only exist inside the wrapper: one view
per model parameter into the flat center (BatchNorm statistics are averaged, never stepped).
With several dtype/device groups (a mixed-precision model) it steps once per group, with only
that group's gradients set: the same result for every element-wise optimizer (SGD, Adam(W),
...), not for one that couples parameters across dtypes.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import torch

from hvd_easgd.optim.flat import FlatGroup

DILOCO_LR = 0.7
DILOCO_MOMENTUM = 0.9
OUTER_METHODS = ("easgd", "diloco")
OuterFactory = Callable[[List[torch.Tensor]], torch.optim.Optimizer]

FACTORY_HINT = (
    "pass a factory that builds it over the tensors it is given, e.g. "
    "outer_optimizer=lambda params: torch.optim.SGD(params, lr=0.7, momentum=0.9, "
    "nesterov=True); the wrapper calls it with the center's tensors"
)


def nesterov(lr: float = DILOCO_LR, momentum: float = DILOCO_MOMENTUM) -> OuterFactory:
    """DiLoCo's outer optimizer: ``torch.optim.SGD(lr, momentum, nesterov=True)``."""

    def factory(params: List[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)

    return factory


def check_outer_options(method: str, outer_optimizer: Any, alpha: Any, beta: Any) -> None:
    """The bad combinations of ``method``, ``outer_optimizer``, ``alpha`` and ``beta``."""
    if method == "diloco" and (alpha is not None or beta is not None):
        given = "alpha" if alpha is not None else "beta"
        raise ValueError(
            f"method='diloco' has no elastic coefficient: workers restart from the center after "
            f"every round, and the center moves by its outer optimizer. Drop {given}=, and set "
            f"the outer step with outer_optimizer=hvd_easgd.optim.outer.nesterov(lr=..., "
            f"momentum=...) (default lr {DILOCO_LR}, momentum {DILOCO_MOMENTUM})"
        )
    if outer_optimizer is None:
        return
    if method not in OUTER_METHODS:
        raise ValueError(
            f"outer_optimizer drives the center of method='easgd' or 'diloco'; method={method!r} "
            f"has its own center rule. Use method='diloco' (which restarts workers from the "
            f"center, like {method!r}) or drop outer_optimizer="
        )
    if isinstance(outer_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"outer_optimizer is an optimizer already built over other tensors (the model's?), "
            f"but it must step the center, which lives inside the wrapper: {FACTORY_HINT}"
        )
    if not callable(outer_optimizer):
        raise TypeError(f"outer_optimizer must be callable; {FACTORY_HINT}")


def center_parameters(groups: List[FlatGroup], center_views) -> List[torch.Tensor]:
    """The tensors an outer optimizer steps: the center's view of every model parameter."""
    return [v for g, views in zip(groups, center_views) for v in views[:g.num_params]]


def build_outer(factory: OuterFactory, params: List[torch.Tensor]) -> torch.optim.Optimizer:
    """Call the factory and check that its optimizer steps exactly the center's tensors."""
    outer = factory(list(params))
    if not isinstance(outer, torch.optim.Optimizer):
        raise TypeError(
            f"outer_optimizer returned {type(outer).__name__}, not a torch.optim.Optimizer; "
            f"{FACTORY_HINT}"
        )
    got = [p for group in outer.param_groups for p in group["params"]]
    if sorted(map(id, got)) != sorted(map(id, params)):
        raise ValueError(
            f"the outer optimizer steps {len(got)} tensors that are not the center's "
            f"{len(params)} (did the factory ignore its argument and use model.parameters()?); "
            f"{FACTORY_HINT}"
        )
    return outer


def describe(outer: Optional[torch.optim.Optimizer]) -> Optional[str]:
    """A short text every worker must agree on (the consistency check compares it)."""
    if outer is None:
        return None
    hyper = {k: v for k, v in outer.param_groups[0].items() if k != "params"}
    return f"{type(outer).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(hyper.items()))})"


def outer_state(outer: Optional[torch.optim.Optimizer]) -> Optional[Dict[str, Any]]:
    """A detached copy of the outer optimizer's state dict (momentum, step counts, lr)."""
    return None if outer is None else copy.deepcopy(outer.state_dict())


class OuterRule:
    """A round whose center update is one step of an outer optimizer (see the module doc)."""

    needs_velocity = False

    def __init__(self, method: str, alpha: float, world_size: int,
                 outer: torch.optim.Optimizer, groups: List[FlatGroup], centers,
                 center_views) -> None:
        self.method, self.alpha, self.world_size, self.outer = method, alpha, world_size, outer
        self.params = [p for group in outer.param_groups for p in group["params"]]
        self._by_center: Dict[int, tuple] = {}
        for g, center, views in zip(groups, centers, center_views):
            grad = torch.zeros(g.param_numel, dtype=g.dtype, device=g.device)
            grads = [v.view(s) for v, s in zip(grad.split(g.numels[:g.num_params]),
                                                g.shapes[:g.num_params])]
            # ElasticOptimizer._apply hands over center[:n]: find the group by its storage.
            self._by_center[center.data_ptr()] = (grad, views[:g.num_params], grads)

    @property
    def snapshot_before_step(self) -> bool:
        return self.method == "easgd"

    @torch.no_grad()
    def apply(self, center: torch.Tensor, diff: torch.Tensor, total: torch.Tensor,
              velocity: Optional[torch.Tensor] = None) -> float:
        """:meth:`ElasticRule.apply`'s contract: update ``center``, return the worker's scale."""
        grad, params, grads = self._by_center[center.data_ptr()]
        torch.mul(total, -1.0 / self.world_size, out=grad)  # g = c - mean_i x_i
        for p in self.params:
            p.grad = None
        for p, g in zip(params, grads):
            p.grad = g
        if self.method == "diloco":
            total.copy_(center)  # the old center, to restart the worker from the new one
        self.outer.step()
        for p in params:
            p.grad = None
        if self.method == "easgd":
            return -self.alpha
        torch.sub(center, total, out=total)  # the center's change
        torch.sub(total, diff, out=diff)
        return 1.0
