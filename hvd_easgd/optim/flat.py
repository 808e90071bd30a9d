"""Flat buffers: the model's tensors of one dtype and device laid end to end.

A round reads every parameter into one flat buffer and writes one flat correction back, with
multi-tensor (``torch._foreach_*``) ops, so its cost does not grow with the number of tensors in
Python. Views into the flat buffers are built once and reused every round.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch


class FlatGroup:
    """Named tensors of one dtype/device: parameters first, then buffers."""

    def __init__(self, names: List[str], tensors: List[torch.Tensor], num_params: int) -> None:
        self.names = names
        self.tensors = tensors
        self.num_params = num_params
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.numel = sum(self.numels)
        self.param_numel = sum(self.numels[:num_params])
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device

    @property
    def nbytes(self) -> int:
        return self.numel * self.tensors[0].element_size()

    def new_buffer(self) -> torch.Tensor:
        return torch.empty(self.numel, dtype=self.dtype, device=self.device)

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """One view of ``flat`` per tensor, shaped like it."""
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes)]

    @torch.no_grad()
    def gather(self, flat_views: Sequence[torch.Tensor]) -> None:
        """Copy the live tensors into the flat buffer behind ``flat_views``."""
        torch._foreach_copy_(list(flat_views), self.tensors)

    @torch.no_grad()
    def scatter_add(self, flat_views: Sequence[torch.Tensor], alpha: float = 1.0,
                    buffer_alpha: float = 1.0) -> None:
        """Add the flat buffer behind ``flat_views`` to the live tensors: ``alpha`` times it to
        the parameters, ``buffer_alpha`` times it to the buffers (``alpha = 0``: no pass)."""
        k = self.num_params
        if k and alpha:
            torch._foreach_add_(self.tensors[:k], list(flat_views[:k]), alpha=alpha)
        if k < len(self.tensors):
            torch._foreach_add_(self.tensors[k:], list(flat_views[k:]), alpha=buffer_alpha)

    @torch.no_grad()
    def scatter_copy(self, flat_views: Sequence[torch.Tensor]) -> None:
        """Overwrite the live tensors with the flat buffer behind ``flat_views``."""
        torch._foreach_copy_(self.tensors, list(flat_views))


def group_tensors(
    named_params: Sequence[Tuple[str, torch.Tensor]],
    named_buffers: Sequence[Tuple[str, torch.Tensor]] = (),
) -> List[FlatGroup]:
    """Split tensors into one :class:`FlatGroup` per (dtype, device), in first-seen order.

    The order is a function of the model alone, so every worker builds the same layout.
    """
    keyed: Dict[Tuple[torch.dtype, torch.device], Tuple[list, list, list, list]] = OrderedDict()
    for kind, named in ((0, named_params), (1, named_buffers)):
        for name, tensor in named:
            entry = keyed.setdefault((tensor.dtype, tensor.device), ([], [], [], []))
            entry[2 * kind].append(name)
            entry[2 * kind + 1].append(tensor)
    groups = []
    for pnames, ptensors, bnames, btensors in keyed.values():
        groups.append(FlatGroup(pnames + bnames, ptensors + btensors, num_params=len(ptensors)))
    return groups
