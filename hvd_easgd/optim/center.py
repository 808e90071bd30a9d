"""What EASGD keeps besides the model, and how it is saved, restored and committed.

:class:`CenterState` owns the flat buffers of one :class:`~hvd_easgd.ElasticOptimizer`: this
worker's replica of the center, MDOWNPOUR's master velocity, ADOWNPOUR/MVADOWNPOUR's averaged
center, and the round buffers that go on the wire. A round buffer holds exactly the model's
values: a NaN/inf contribution shows in the round's sum, which every worker checks before applying
it (:meth:`CenterState.round_is_finite`); only then do the workers ask each other who sent it.

:func:`pack_state_dict` / :func:`unpack_state_dict` put the center into the local optimizer's
``state_dict`` (per parameter, like timm's Lookahead keeps its slow weights) so checkpoints and
``hvd.broadcast_optimizer_state`` carry it. :class:`Commit` is an in-memory copy of everything a
Horovod Elastic ``commit()`` must be able to roll back to.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from hvd_easgd.optim.flat import FlatGroup
from hvd_easgd.optim.outer import OuterFactory, build_outer, center_parameters

STATE_VERSION = 1
Views = List[List[torch.Tensor]]


@dataclass
class Counters:
    """The optimizer's loop state: what a commit, a checkpoint and a resync carry."""

    step: int = 0  # calls of step()
    round: int = 0  # rounds started
    #: The last rounds' verdicts, newest in bit 0: 1 = skipped for a non-finite contribution.
    bad_history: int = 0

    def record_round(self, bad: bool, window: int) -> int:
        """Add a round's verdict; return how many of the last ``window`` rounds were bad."""
        self.bad_history = ((self.bad_history << 1) | int(bad)) & ((1 << window) - 1)
        return bin(self.bad_history).count("1")

    def count_step(self) -> None:
        self.step += 1

    def start_round(self) -> None:
        self.round += 1

    def drop_round(self) -> None:
        """A started round that nobody applies (a Horovod Elastic reset): it never happened."""
        self.round -= 1

    def load(self, other: "Counters") -> None:
        """Take ``other``'s values (a commit, a state dict or a resync replaces the loop state)."""
        self.step, self.round, self.bad_history = other.step, other.round, other.bad_history


class CenterState:
    """The center (and its velocity / average) plus the round buffers, as flat tensors.

    ``outer``: the factory of the optimizer that moves the center (:mod:`hvd_easgd.optim.outer`),
    built here over the center's tensors and kept as :attr:`outer`; None for EASGD's own rule.
    """

    def __init__(self, groups: List[FlatGroup], *, velocity: bool, average: bool,
                 slots: int, outer: Optional[OuterFactory] = None) -> None:
        self.groups = groups
        self.where = {
            id(t): (gi, ti) for gi, g in enumerate(groups) for ti, t in enumerate(g.tensors)
        }
        self.centers = [g.new_buffer() for g in groups]
        self.velocity = [torch.zeros_like(c) for c in self.centers] if velocity else None
        self.averages = [torch.empty_like(c) for c in self.centers] if average else None
        self.center_views = self.views_of(self.centers)
        self.velocity_views = self.views_of(self.velocity)
        self.average_views = self.views_of(self.averages)
        self.slots = slots
        self.outer: Optional[torch.optim.Optimizer] = None if outer is None else build_outer(
            outer, center_parameters(groups, self.center_views))
        self.rounds: List[List[torch.Tensor]] = []
        self.round_views: List[Views] = []

    def views_of(self, buffers: Optional[List[torch.Tensor]]) -> Optional[Views]:
        """Per group, one view of each flat buffer per tensor (built once, reused)."""
        if buffers is None:
            return None
        return [g.views(b) for g, b in zip(self.groups, buffers)]

    # ------------------------------------------------------------------ round buffers

    def allocate_rounds(self) -> None:
        """Allocate the round buffers (once): one flat buffer per group and slot, nothing more."""
        if self.rounds:
            return
        for _ in range(self.slots):
            bufs = [torch.zeros(g.numel, dtype=g.dtype, device=g.device) for g in self.groups]
            self.rounds.append(bufs)
            self.round_views.append([g.views(b) for g, b in zip(self.groups, bufs)])

    def snapshot(self, slot: int) -> None:
        """Copy the live parameters (and buffers) into round buffer ``slot``."""
        for g, views in zip(self.groups, self.round_views[slot]):
            g.gather(views)

    @torch.no_grad()
    def seal(self, slot: int, from_live: bool = False) -> None:
        """Turn the snapshot into ``d = snapshot - center``.

        ``from_live``: there is no snapshot; ``d = x - center`` is written straight from the
        live tensors (one pass instead of a copy and a subtraction).
        """
        for gi, (buf, center) in enumerate(zip(self.rounds[slot], self.centers)):
            if from_live:
                for live, c, out in zip(self.groups[gi].tensors, self.center_views[gi],
                                        self.round_views[slot][gi]):
                    torch.sub(live, c, out=out)
            else:
                buf.sub_(center)

    @staticmethod
    def round_is_finite(totals: Sequence[torch.Tensor]) -> bool:
        """Whether a round's sums hold no NaN/inf (one summing pass per flat buffer).

        A non-finite contribution from any worker makes the sum non-finite, so this one check on
        the totals, identical on every worker, tells all of them whether to apply the round.
        """
        return all(bool(torch.isfinite(t.sum())) for t in totals if t.numel())

    def locally_finite(self, slot: int) -> bool:
        """Whether this worker's own contribution to round ``slot`` was finite."""
        return all(bool(torch.isfinite(b.sum())) for b in self.rounds[slot] if b.numel())

    # ------------------------------------------------------------------ center <-> live

    @torch.no_grad()
    def reset_from_live(self) -> None:
        """Start the center (and its average) at the live tensors, the velocity at zero."""
        for g, views in zip(self.groups, self.center_views):
            g.gather(views)
        if self.averages is not None:
            for average, center in zip(self.averages, self.centers):
                average.copy_(center)
        if self.velocity is not None:
            for velocity in self.velocity:
                velocity.zero_()

    @torch.no_grad()
    def center_from_live_params(self) -> None:
        """Set the center's parameters (and their average) to the live ones; the buffers'
        center is left alone (workers' BatchNorm statistics differ until a round averages
        them, and the replicas of the center must not)."""
        for views in (self.center_views, self.average_views or []):
            for g, group_views in zip(self.groups, views):
                k = g.num_params
                if k:
                    torch._foreach_copy_(list(group_views[:k]), g.tensors[:k])

    @torch.no_grad()
    def live_from_center(self) -> None:
        """Put every live parameter and averaged buffer at the center."""
        for g, views in zip(self.groups, self.center_views):
            g.scatter_copy(views)

    def tensors(self) -> List[torch.Tensor]:
        """Every flat buffer that workers must agree on (center, velocity, average)."""
        return self.centers + (self.velocity or []) + (self.averages or [])

    def named_views(self, views: Views) -> Dict[str, torch.Tensor]:
        return {
            name: view
            for group, group_views in zip(self.groups, views)
            for name, view in zip(group.names, group_views)
        }


# ---------------------------------------------------------------------- commits


@dataclass
class Commit:
    """An in-memory copy of one worker's complete EASGD state (Horovod Elastic's ``save``)."""

    live: List[torch.Tensor]
    tensors: List[torch.Tensor]
    local_state: Dict[str, Any]
    counters: Counters
    outer_state: Optional[Dict[str, Any]] = None  # the outer optimizer's (hvd_easgd.optim.outer)


@torch.no_grad()
def take_commit(state: CenterState, local: torch.optim.Optimizer, counters: Counters,
                reuse: Optional[Commit] = None) -> Commit:
    """Copy everything a rollback needs; into ``reuse``'s buffers when it has the same layout
    (no allocation: a commit is then a few memcpy passes)."""
    if reuse is None:
        live = [g.new_buffer() for g in state.groups]
        tensors = [torch.empty_like(t) for t in state.tensors()]
        local_state = copy.deepcopy(local.state_dict())
    else:
        live, tensors = reuse.live, reuse.tensors
        local_state = copy_into(reuse.local_state, local.state_dict())
    outer_state = None
    if state.outer is not None:
        outer_state = copy_into(reuse.outer_state if reuse is not None else None,
                                state.outer.state_dict())
    for g, flat in zip(state.groups, live):
        g.gather(g.views(flat))
    torch._foreach_copy_(tensors, state.tensors())
    return Commit(live=live, tensors=tensors, local_state=local_state, counters=replace(counters),
                  outer_state=outer_state)


def copy_into(saved: Any, current: Any) -> Any:
    """``current`` copied into ``saved``'s tensors where the structure and shapes agree,
    deep-copied where they do not (a state entry that appeared since)."""
    if isinstance(current, torch.Tensor):
        if (isinstance(saved, torch.Tensor) and saved.shape == current.shape
                and saved.dtype == current.dtype and saved.device == current.device):
            return saved.copy_(current)
        return current.detach().clone()
    if isinstance(current, dict):
        saved = saved if isinstance(saved, dict) else {}
        return {k: copy_into(saved.get(k), v) for k, v in current.items()}
    if isinstance(current, (list, tuple)):
        saved = saved if isinstance(saved, (list, tuple)) and len(saved) == len(current) else [None] * len(current)
        return type(current)(copy_into(a, b) for a, b in zip(saved, current))
    return copy.deepcopy(current)


@torch.no_grad()
def restore_live(state: CenterState, commit: Commit) -> None:
    """Put the committed parameters and buffers back into the model, and nothing else."""
    for g, flat in zip(state.groups, commit.live):
        g.scatter_copy(g.views(flat))


@torch.no_grad()
def restore_commit(state: CenterState, local: torch.optim.Optimizer, commit: Commit,
                   *, live: bool = True) -> Counters:
    """Copy a commit back; return its counters. ``live=False`` leaves the model alone."""
    if live:
        restore_live(state, commit)
    for mine, saved in zip(state.tensors(), commit.tensors):
        mine.copy_(saved)
    # A deep copy: torch's load_state_dict may keep the very tensors it is given, and the
    # commit must survive the steps that follow (a second failure restores it again).
    local.load_state_dict(copy.deepcopy(commit.local_state))
    if state.outer is not None and commit.outer_state is not None:
        state.outer.load_state_dict(copy.deepcopy(commit.outer_state))
    return replace(commit.counters)


# ---------------------------------------------------------------------- state dicts


def pack_state_dict(sd: Dict[str, Any], state: CenterState, params: List[torch.Tensor],
                    counters: Counters, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Add the center and the counters to a local optimizer's state dict ``sd`` (in place).

    Each parameter's entry gains ``easgd_center`` (and ``easgd_center_average`` /
    ``easgd_velocity`` when used); a top-level ``easgd`` entry holds the counters, the settings
    and the center of the averaged buffers.
    """
    entries = {index: dict(entry) for index, entry in sd["state"].items()}
    extras = {"easgd_center": state.center_views}
    if state.average_views is not None:
        extras["easgd_center_average"] = state.average_views
    if state.velocity_views is not None:
        extras["easgd_velocity"] = state.velocity_views
    for index, param in enumerate(params):
        gi, ti = state.where[id(param)]
        entry = entries.setdefault(index, {})
        for key, views in extras.items():
            entry[key] = views[gi][ti].clone()
    buffers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, views in extras.items():
        for group, group_views in zip(state.groups, views):
            k = group.num_params
            for name, view in zip(group.names[k:], group_views[k:]):
                buffers.setdefault(key, {})[name] = view.clone()
    sd["state"] = entries
    sd["easgd"] = {"version": STATE_VERSION, "step": counters.step, "round": counters.round,
                   **settings, "buffers": buffers}
    return sd


def split_state_dict(state_dict: Dict[str, Any]):
    """``(local optimizer's state dict, per-parameter EASGD entries, the easgd header)``."""
    state_dict = dict(state_dict)
    easgd = state_dict.pop("easgd", None)
    base_state, ours = {}, {}
    for index, entry in state_dict["state"].items():
        entry = dict(entry)
        mine = {k: entry.pop(k) for k in list(entry) if str(k).startswith("easgd_")}
        if entry:
            base_state[index] = entry
        if mine:
            ours[index] = mine
    return {**state_dict, "state": base_state}, ours, easgd


@torch.no_grad()
def unpack_state_dict(state: CenterState, params: List[torch.Tensor],
                      ours: Dict[int, Dict[str, torch.Tensor]], easgd: Dict[str, Any]) -> Counters:
    """Load the center (and velocity / average) saved by :func:`pack_state_dict`."""
    for index, param in enumerate(params):
        gi, ti = state.where[id(param)]
        saved = ours[index]
        state.center_views[gi][ti].copy_(saved["easgd_center"])
        if state.average_views is not None:
            state.average_views[gi][ti].copy_(
                saved.get("easgd_center_average", saved["easgd_center"]))
        if state.velocity_views is not None and "easgd_velocity" in saved:
            state.velocity_views[gi][ti].copy_(saved["easgd_velocity"])
    _unpack_buffers(state, easgd.get("buffers", {}))
    return Counters(step=int(easgd["step"]), round=int(easgd["round"]))


def warn_if_saved_elsewhere(easgd: Dict[str, Any], world_size: int, method: str,
                            alpha: float) -> None:
    """Warn when a state dict comes from a job with another number of workers or method."""
    if easgd.get("world_size", world_size) != world_size:
        warnings.warn(
            f"the state dict was saved with {easgd['world_size']} workers and this job has "
            f"{world_size}: alpha = beta / p is now {alpha:g}. Restart every worker from the "
            "center (load center_state_dict() into the model) for a clean resume.",
            stacklevel=3,
        )
    if easgd.get("method", method) != method:
        warnings.warn(
            f"the state dict was saved by method {easgd['method']!r}; continuing with {method!r}",
            stacklevel=3,
        )


def adopt_sync_sgd_steps(easgd: Dict[str, Any], sync_sgd_steps: int) -> int:
    """The switch point from synchronous SGD to EASGD that a resumed run keeps: the one it was
    saved with (a run switches once, at the step it planned), with a warning if this job asked
    for another. State dicts saved before the switch point existed keep ``sync_sgd_steps``."""
    saved = easgd.get("sync_sgd_steps")
    if saved is None or int(saved) == sync_sgd_steps:
        return sync_sgd_steps
    warnings.warn(
        f"the state dict was saved with sync_sgd_steps={saved} and this optimizer has "
        f"sync_sgd_steps={sync_sgd_steps}: keeping the saved switch point, {saved}",
        stacklevel=3,
    )
    return int(saved)


def _unpack_buffers(state: CenterState, saved: Dict[str, Dict[str, torch.Tensor]]) -> None:
    for gi, group in enumerate(state.groups):
        for ti in range(group.num_params, len(group.tensors)):
            name = group.names[ti]
            center = saved.get("easgd_center", {}).get(name)
            if center is None:
                warnings.warn(f"no saved center for buffer {name!r}; using its current value")
                center = group.tensors[ti]
            state.center_views[gi][ti].copy_(center)
            if state.average_views is not None:
                average = saved.get("easgd_center_average", {}).get(name, center)
                state.average_views[gi][ti].copy_(average)
