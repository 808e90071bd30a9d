"""The elastic optimizer: EASGD, EAMSGD and the paper's baselines around any torch optimizer.

:class:`ElasticOptimizer` wraps a ``torch.optim.Optimizer``. Every ``tau``-th ``step()`` is a
communication round: one fused Horovod allreduce of the parameters (as differences to the
center) updates every worker's replica of the center variable and pulls the worker toward it.
The replicas receive identical updates, so they stay bit-identical without a parameter server.
The math lives in :mod:`hvd_easgd.elastic`, the communication in :mod:`hvd_easgd.comm`.

:func:`DistributedOptimizer` is a drop-in for ``hvd.DistributedOptimizer``: change the one call
and an existing Horovod script trains with EASGD.
"""

from __future__ import annotations

import atexit
import itertools
import math
import numbers
import time
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import horovod.torch as hvd
import torch

from hvd_easgd.comm import BackgroundExchange, Communicator, ExchangeStats
from hvd_easgd.elastic import (
    CENTER_AVERAGES,
    METHODS,
    ElasticRule,
    buffer_rule,
    update_center_average,
)
from hvd_easgd.flat import group_tensors

MODES = ("sync", "async")
DEFAULT_BETA = 0.9
STATE_VERSION = 1

NamedTensors = List[Tuple[str, torch.Tensor]]

# Every worker constructs its optimizers in the same order, so this numbering (used in Horovod
# tensor names) agrees across workers and keeps two optimizers' rounds apart.
_instance_ids = itertools.count()


class ElasticOptimizer(torch.optim.Optimizer):
    """Elastic Averaging SGD around a local optimizer (Zhang, Choromanska & LeCun, 2015).

    Args:
        optimizer: the local optimizer, e.g. ``torch.optim.SGD(..., momentum=0.99,
            nesterov=True)`` for EAMSGD, or Adam. It keeps its own per-worker state.
        named_parameters: ``model.named_parameters()``; names appear in errors, Horovod tensor
            names and :meth:`center_state_dict`. Without it parameters are named by position.
        tau: local steps per communication round (a round at steps tau, 2*tau, ...).
        beta: the center's moving rate, in (0, 1]; ``alpha = beta / hvd.size()``. Default 0.9
            (the paper's value) when ``alpha`` is not given.
        alpha: the elastic coefficient instead of ``beta`` (then ``beta = p * alpha``).
        method: ``"easgd"``, ``"downpour"``, ``"mdownpour"`` or ``"average"`` (local SGD); see
            :mod:`hvd_easgd.elastic` for the exact rules.
        mode: ``"sync"`` applies each round at once; ``"async"`` runs the round's allreduce on a
            background thread and applies it at the next round (``tau`` steps later) or at
            :meth:`synchronize`, so training does not wait for communication.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16`` for the wire format;
            the center is always kept in the parameters' own precision.
        named_buffers: e.g. ``model.named_buffers()``: floating-point buffers (BatchNorm running
            statistics) are averaged over workers at every round, in the same allreduce, and
            appear in :meth:`center_state_dict`. Integer buffers stay local. Off by default.
        center_average: ``"running"`` (ADOWNPOUR's 1/(t+1) average of the centers) or
            ``"moving"`` (MVADOWNPOUR/MVASGD's moving average, rate ``center_average_rate``),
            folded after every round with no communication; see
            :meth:`averaged_center_state_dict`.
        master_momentum: MDOWNPOUR's Nesterov momentum on the center (``method="mdownpour"``).
        check_consistency: check once, at construction, that every worker has the same
            parameter names, shapes and dtypes (one small allgather).

    Memory: the center (1x the synchronised tensors), one round buffer in sync mode and two in
    async mode (the round on the wire and the next snapshot), plus Horovod's output buffer for
    the round on the wire: about 3x the parameter bytes in sync mode, 4x in async mode.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
        *,
        tau: int = 10,
        beta: Optional[float] = None,
        alpha: Optional[float] = None,
        method: str = "easgd",
        mode: str = "sync",
        compression: Any = hvd.Compression.none,
        named_buffers: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
        center_average: Optional[str] = None,
        center_average_rate: float = 0.001,
        master_momentum: float = 0.0,
        check_consistency: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, ElasticOptimizer):
            raise TypeError("the optimizer is already an ElasticOptimizer; wrap the plain one")
        world_size = hvd.size()
        self.tau = check_tau(tau)
        self.alpha, self.beta = resolve_coefficients(alpha, beta, world_size)
        self.method = _check_choice("method", method, METHODS)
        self.mode = _check_choice("mode", mode, MODES)
        self.center_average = _check_center_average(center_average, center_average_rate)
        self.center_average_rate = float(center_average_rate)
        if not 0.0 <= master_momentum < 1.0:
            raise ValueError(f"master_momentum must be in [0, 1), got {master_momentum}")
        if master_momentum and method != "mdownpour":
            raise ValueError(
                f"master_momentum is MDOWNPOUR's momentum; use method='mdownpour' or drop it "
                f"(method is {method!r})"
            )
        if not (hasattr(compression, "compress") and hasattr(compression, "decompress")):
            raise TypeError("compression must be a Horovod compressor, e.g. hvd.Compression.fp16")

        named = _name_parameters(optimizer, named_parameters)
        buffers = _float_buffers(named_buffers, named)
        self._elastic_ready = False
        super().__init__([{"params": [p for _, p in named]}], {})
        self.optimizer = optimizer
        self._link()
        self._elastic_ready = True

        self.rule = ElasticRule(method, self.alpha, world_size, float(master_momentum))
        self._buffer_rule = buffer_rule(world_size)
        if check_consistency:
            check_same_model(named, buffers)
        hvd.broadcast_parameters(named + buffers, root_rank=0)

        self._param_names = [name for name, _ in named]
        self._groups = group_tensors(named, buffers)
        self._where = {
            id(t): (gi, ti) for gi, g in enumerate(self._groups) for ti, t in enumerate(g.tensors)
        }
        self._centers = [g.new_buffer() for g in self._groups]
        self._center_views = self._views_of(self._centers)
        for g, views in zip(self._groups, self._center_views):
            g.gather(views)
        slots = 2 if self.mode == "async" else 1
        self._rounds_buf = [[g.new_buffer() for g in self._groups] for _ in range(slots)]
        self._rounds_views = [
            [g.views(b) for g, b in zip(self._groups, bufs)] for bufs in self._rounds_buf
        ]
        self._averages = [c.clone() for c in self._centers] if center_average else None
        self._velocity = (
            [torch.zeros_like(c) for c in self._centers] if self.rule.needs_velocity else None
        )
        self._average_views = self._views_of(self._averages)
        self._velocity_views = self._views_of(self._velocity)

        self.stats = ExchangeStats()
        self.communicator = Communicator(compression, f"hvd_easgd.{next(_instance_ids)}", self.stats)
        self._exchange = BackgroundExchange(self.communicator) if mode == "async" else None
        self._step = 0
        self._round = 0
        self._slot_in_flight: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._at_exit = _close_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)

    # ------------------------------------------------------------------ the algorithm

    @property
    def step_count(self) -> int:
        """Calls of :meth:`step` so far (including those restored from a state dict)."""
        return self._step

    @property
    def round_count(self) -> int:
        """Communication rounds started so far."""
        return self._round

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One local optimizer step; at every ``tau``-th step, also a communication round."""
        self._raise_if_failed()
        self._step += 1
        self.stats.steps += 1
        if self._step % self.tau:
            return self.optimizer.step(closure)
        slot = self._free_slot()
        pending = None
        if self.rule.snapshot_before_step:
            self._snapshot(slot)
            if self._exchange is None:
                # Sync EASGD: nothing moves the center before this round lands, so its
                # allreduce can run while the local optimizer updates the parameters.
                self._start_round(slot)
                pending = self.communicator.start(self._rounds_buf[slot], self._round)
        loss = self.optimizer.step(closure)
        if self._exchange is None:
            if pending is None:
                self._snapshot(slot)
                self._start_round(slot)
                pending = self.communicator.start(self._rounds_buf[slot], self._round)
            started = time.perf_counter()
            totals = self.communicator.wait(pending)
            self.stats.wait_seconds += time.perf_counter() - started
            self.stats.stalls += 1
            self._apply(slot, totals)
            return loss
        if self._exchange.in_flight:
            self._finish_round()
        if not self.rule.snapshot_before_step:
            # After the previous round landed: a pulling method's difference must not count
            # again the pull the worker has just received.
            self._snapshot(slot)
        self._start_round(slot)
        self._exchange.submit(self._rounds_buf[slot], self._round)
        self._slot_in_flight = slot
        return loss

    def synchronize(self) -> None:
        """Wait for the round in flight and apply it (async mode); a no-op in sync mode.

        Call it before evaluating or saving the center. Every worker must call it at the same
        step, as with any collective.
        """
        self._raise_if_failed()
        if self._exchange is not None and self._exchange.in_flight:
            self._finish_round()

    def _free_slot(self) -> int:
        return 1 if self._slot_in_flight == 0 else 0

    def _snapshot(self, slot: int) -> None:
        for g, views in zip(self._groups, self._rounds_views[slot]):
            g.gather(views)

    @torch.no_grad()
    def _start_round(self, slot: int) -> None:
        # d = snapshot - center, against the center this round will be applied to: nothing
        # changes the center between here and the round's application.
        for buf, center in zip(self._rounds_buf[slot], self._centers):
            buf.sub_(center)
        self._round += 1
        self.stats.rounds += 1

    def _finish_round(self) -> None:
        assert self._exchange is not None and self._slot_in_flight is not None
        try:
            totals, waited, stalled = self._exchange.collect()
        except BaseException as error:
            self._error = error
            raise
        self.stats.wait_seconds += waited
        self.stats.stalls += int(stalled)
        slot, self._slot_in_flight = self._slot_in_flight, None
        self._apply(slot, totals)

    def _apply(self, slot: int, totals: Sequence[torch.Tensor]) -> None:
        for gi, group in enumerate(self._groups):
            center, diff, total = self._centers[gi], self._rounds_buf[slot][gi], totals[gi]
            n = group.param_numel
            velocity = self._velocity[gi][:n] if self._velocity is not None else None
            if n:
                self.rule.apply(center[:n], diff[:n], total[:n], velocity)
            if n < group.numel:
                self._buffer_rule.apply(center[n:], diff[n:], total[n:])
            group.scatter_add(self._rounds_views[slot][gi])
            if self._averages is not None:
                update_center_average(
                    self._averages[gi], center, self.center_average, self._applied_rounds(),
                    self.center_average_rate,
                )

    def _applied_rounds(self) -> int:
        return self._round - (1 if self._slot_in_flight is not None else 0)

    def _raise_if_failed(self) -> None:
        if self._closed:
            raise RuntimeError("this ElasticOptimizer was closed; create a new one to go on")
        if self._error is None and self._exchange is not None and self._exchange.failed():
            self._finish_round()  # re-raises the round's own exception, here
        if self._error is not None:
            raise RuntimeError(
                "an earlier EASGD round failed (see the cause above); this optimizer cannot "
                "go on. Restart the job, resuming from the last checkpoint."
            ) from self._error

    # ------------------------------------------------------------------ results

    def center_state_dict(self) -> Dict[str, torch.Tensor]:
        """``{name: tensor}`` of the center: every parameter and every averaged buffer.

        Load it with ``model.load_state_dict(opt.center_state_dict(), strict=False)``. The
        tensors are live views of the center (clone them to keep a copy); in async mode call
        :meth:`synchronize` first to include the round in flight.
        """
        return self._named_views(self._center_views)

    def averaged_center_state_dict(self) -> Dict[str, torch.Tensor]:
        """Like :meth:`center_state_dict`, for the running/moving average of the center."""
        if self._averages is None:
            raise ValueError(
                "no averaged center is kept: create the optimizer with "
                "center_average='running' or 'moving'"
            )
        return self._named_views(self._average_views)

    def _named_views(self, views: List[List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return {
            name: view
            for group, group_views in zip(self._groups, views)
            for name, view in zip(group.names, group_views)
        }

    @torch.no_grad()
    def local_distance(self) -> float:
        """``||x - c||_2`` over the parameters: how far this worker has wandered."""
        total = 0.0
        for group, views in zip(self._groups, self._center_views):
            k = group.num_params
            if k:
                diffs = torch._foreach_sub(group.tensors[:k], views[:k])
                total += float(sum(float(n) ** 2 for n in torch._foreach_norm(diffs)))
        return math.sqrt(total)

    # ------------------------------------------------------------------ torch.optim API

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not getattr(self, "_elastic_ready", False):
            super().add_param_group(param_group)
            return
        raise NotImplementedError(
            "the center is laid out at construction: add every param group to the local "
            "optimizer before wrapping it in ElasticOptimizer"
        )

    def state_dict(self) -> Dict[str, Any]:
        """The local optimizer's state dict plus the center and the counters.

        Each parameter's entry gains ``easgd_center`` (and ``easgd_center_average`` /
        ``easgd_velocity`` when used); a top-level ``easgd`` entry holds the step and round
        counters, the settings and the center of the averaged buffers. In async mode the
        round in flight is applied first, so a checkpoint never loses a round.
        """
        self.synchronize()
        sd = self.optimizer.state_dict()
        state = {index: dict(entry) for index, entry in sd["state"].items()}
        extras = {"easgd_center": self._center_views}
        if self._average_views is not None:
            extras["easgd_center_average"] = self._average_views
        if self._velocity_views is not None:
            extras["easgd_velocity"] = self._velocity_views
        for index, param in enumerate(self._params()):
            gi, ti = self._where[id(param)]
            entry = state.setdefault(index, {})
            for key, views in extras.items():
                entry[key] = views[gi][ti].clone()
        buffers = {}
        for key, views in extras.items():
            for group, group_views in zip(self._groups, views):
                for name, view in zip(group.names[group.num_params:], group_views[group.num_params:]):
                    buffers.setdefault(key, {})[name] = view.clone()
        sd["state"] = state
        sd["easgd"] = {
            "version": STATE_VERSION,
            "step": self._step,
            "round": self._round,
            "method": self.method,
            "mode": self.mode,
            "tau": self.tau,
            "alpha": self.alpha,
            "beta": self.beta,
            "world_size": hvd.size(),
            "buffers": buffers,
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the local optimizer, the center and the counters saved by :meth:`state_dict`.

        A state dict of the plain local optimizer (no EASGD entries) loads with a warning: the
        center restarts from the current parameters, so load the same model weights on every
        worker first.
        """
        self.synchronize()
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
        self.optimizer.load_state_dict({**state_dict, "state": base_state})
        self._link()
        params = self._params()
        if easgd is None or len(ours) != len(params):
            warnings.warn(
                "the state dict has no EASGD center or counters (saved from the plain "
                "optimizer?): the center restarts from the current parameters and the step "
                "counter from 0. Load the same model weights on every worker before this call.",
                stacklevel=2,
            )
            self._reset_center()
            return
        with torch.no_grad():
            for index, param in enumerate(params):
                gi, ti = self._where[id(param)]
                self._center_views[gi][ti].copy_(ours[index]["easgd_center"])
                if self._averages is not None:
                    saved = ours[index].get("easgd_center_average", ours[index]["easgd_center"])
                    self._average_views[gi][ti].copy_(saved)
                if self._velocity is not None and "easgd_velocity" in ours[index]:
                    self._velocity_views[gi][ti].copy_(ours[index]["easgd_velocity"])
            self._load_buffer_centers(easgd.get("buffers", {}))
        self._step = int(easgd["step"])
        self._round = int(easgd["round"])
        if easgd.get("world_size", hvd.size()) != hvd.size():
            warnings.warn(
                f"the state dict was saved with {easgd['world_size']} workers and this job has "
                f"{hvd.size()}: alpha = beta / p is now {self.alpha:g}. Restart every worker "
                "from the center (load center_state_dict() into the model) for a clean resume.",
                stacklevel=2,
            )
        if easgd.get("method", self.method) != self.method:
            warnings.warn(
                f"the state dict was saved by method {easgd['method']!r}; continuing with "
                f"{self.method!r}",
                stacklevel=2,
            )

    def _views_of(
        self, buffers: Optional[List[torch.Tensor]]
    ) -> Optional[List[List[torch.Tensor]]]:
        """Per group, one view of each flat buffer per tensor (built once, reused)."""
        if buffers is None:
            return None
        return [g.views(b) for g, b in zip(self._groups, buffers)]

    def _load_buffer_centers(self, saved: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for gi, group in enumerate(self._groups):
            for ti in range(group.num_params, len(group.tensors)):
                name = group.names[ti]
                center = saved.get("easgd_center", {}).get(name)
                if center is None:
                    warnings.warn(f"no saved center for buffer {name!r}; using its current value")
                    center = group.tensors[ti]
                self._center_views[gi][ti].copy_(center)
                if self._averages is not None:
                    average = saved.get("easgd_center_average", {}).get(name, center)
                    self._average_views[gi][ti].copy_(average)

    @torch.no_grad()
    def _reset_center(self) -> None:
        for group, views in zip(self._groups, self._center_views):
            group.gather(views)
        if self._averages is not None:
            for average, center in zip(self._averages, self._centers):
                average.copy_(center)
        if self._velocity is not None:
            for velocity in self._velocity:
                velocity.zero_()
        self._step = 0
        self._round = 0

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _link(self) -> None:
        # Share, not copy: LR schedulers and hvd.broadcast_optimizer_state edit these in place.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Finish the round in flight (applying it) and stop the background thread.

        Called by ``with ElasticOptimizer(...) as opt:`` and at interpreter exit; safe to call
        more than once. A round that failed is reported as a warning here, not raised.
        """
        if self._closed:
            return
        try:
            if self._error is None and self._exchange is not None and self._exchange.in_flight:
                self._finish_round()
        except Exception as error:  # noqa: BLE001 - closing must not hang or mask the cause
            warnings.warn(f"the last EASGD round failed while closing: {error!r}")
        finally:
            if self._exchange is not None:
                self._exchange.close()
            self._closed = True
            atexit.unregister(self._at_exit)

    def __enter__(self) -> "ElasticOptimizer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ElasticOptimizer(method={self.method!r}, mode={self.mode!r}, tau={self.tau}, "
            f"alpha={self.alpha:g}, beta={self.beta:g}, optimizer={self.optimizer!r})"
        )


def _close_at_exit(ref: "weakref.ref[ElasticOptimizer]") -> Callable[[], None]:
    def close() -> None:
        opt = ref()
        if opt is not None:
            opt.close()

    return close


# ---------------------------------------------------------------------- argument checks


def check_tau(tau: Any) -> int:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Integral) or tau < 1:
        raise ValueError(
            f"tau must be an integer >= 1 (local steps between communication rounds; the "
            f"paper uses 1 to 64), got {tau!r}"
        )
    return int(tau)


def resolve_coefficients(
    alpha: Optional[float], beta: Optional[float], world_size: int
) -> Tuple[float, float]:
    """``(alpha, beta)`` from whichever one was given, with ``beta = p * alpha``."""
    if alpha is not None and beta is not None:
        raise ValueError(
            "give either beta (then alpha = beta / p) or alpha (then beta = p * alpha), not both"
        )
    if alpha is not None:
        alpha = _check_real("alpha", alpha)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (the elastic coefficient), got {alpha}")
        beta = alpha * world_size
        if beta > 1:
            raise ValueError(
                f"alpha={alpha} with {world_size} workers gives beta = p * alpha = {beta:g} > 1; "
                f"use alpha <= {1 / world_size:g}, or give beta in (0, 1] instead"
            )
        return alpha, beta
    beta = DEFAULT_BETA if beta is None else _check_real("beta", beta)
    if not 0 < beta <= 1:
        raise ValueError(
            f"beta must be in (0, 1] (the center's step toward the workers' mean; the paper "
            f"uses 0.9), got {beta}"
        )
    return beta / world_size, beta


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value


def _check_center_average(kind: Optional[str], rate: float) -> Optional[str]:
    if kind is not None and kind not in CENTER_AVERAGES:
        raise ValueError(
            f"unknown center_average {kind!r}; choose None, {', '.join(map(repr, CENTER_AVERAGES))}"
        )
    if not 0 < rate <= 1:
        raise ValueError(f"center_average_rate must be in (0, 1], got {rate}")
    return kind


def _name_parameters(
    optimizer: torch.optim.Optimizer, named_parameters: Optional[Iterable[Tuple[str, Any]]]
) -> NamedTensors:
    """The optimizer's parameters, in its order, with their names."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        return [
            (f"param_groups.{gi}.{pi}", p)
            for gi, group in enumerate(optimizer.param_groups)
            for pi, p in enumerate(group["params"])
        ]
    named = list(named_parameters)
    if any(not (isinstance(item, tuple) and len(item) == 2) for item in named):
        raise ValueError(
            "named_parameters must be (name, parameter) pairs, e.g. model.named_parameters()"
        )
    seen = set()
    duplicates = sorted({name for name, _ in named if name in seen or seen.add(name)})
    if duplicates:
        raise ValueError(f"named_parameters has duplicate names: {', '.join(duplicates)}")
    names = {id(p): name for name, p in named}
    missing = [tuple(p.shape) for p in params if id(p) not in names]
    if missing:
        raise ValueError(
            f"{len(missing)} of the optimizer's parameters are not in named_parameters (shapes "
            f"{missing[:3]}); pass model.named_parameters() of the model the optimizer trains"
        )
    return [(names[id(p)], p) for p in params]


def _float_buffers(
    named_buffers: Optional[Iterable[Tuple[str, torch.Tensor]]], named: NamedTensors
) -> NamedTensors:
    if named_buffers is None:
        return []
    buffers = [(n, b) for n, b in named_buffers if b is not None and b.is_floating_point()]
    clash = {n for n, _ in buffers} & {n for n, _ in named}
    if clash:
        raise ValueError(f"buffer names clash with parameter names: {sorted(clash)}")
    return buffers


def check_same_model(named: NamedTensors, buffers: NamedTensors) -> None:
    """Raise on every worker, naming the first difference, if the workers' models differ."""
    mine = [("parameter", n, tuple(t.shape), str(t.dtype)) for n, t in named]
    mine += [("buffer", n, tuple(t.shape), str(t.dtype)) for n, t in buffers]
    everyone = hvd.allgather_object(mine)
    reference = everyone[0]

    def describe(entry: Optional[tuple]) -> str:
        if entry is None:
            return "nothing there"
        kind, name, shape, dtype = entry
        return f"{kind} {name!r} of shape {list(shape)} and {dtype}"

    for rank, theirs in enumerate(everyone[1:], start=1):
        for index in range(max(len(reference), len(theirs))):
            a = reference[index] if index < len(reference) else None
            b = theirs[index] if index < len(theirs) else None
            if a != b:
                name = (a or b)[1]
                raise ValueError(
                    f"workers' models differ at {name!r} (tensor #{index}): rank 0 has "
                    f"{describe(a)}, rank {rank} has {describe(b)}. Every worker must build the "
                    "same model (architecture, dtype, parameter order) before wrapping its "
                    "optimizer."
                )


# ---------------------------------------------------------------------- Horovod drop-in


def DistributedOptimizer(  # noqa: N802 - mirrors hvd.DistributedOptimizer
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
    compression: Any = hvd.Compression.none,
    backward_passes_per_step: int = 1,
    op: Any = hvd.Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: Any = hvd.global_process_set,
    **easgd_kwargs: Any,
) -> ElasticOptimizer:
    """A drop-in for ``hvd.DistributedOptimizer`` that trains with EASGD.

    Takes Horovod's arguments plus :class:`ElasticOptimizer`'s keywords (``tau``, ``beta``,
    ``method``, ``mode``, ...). EASGD exchanges parameters, not gradients, so the arguments that
    shape the gradient allreduce have no effect: they are accepted with a warning, and refused
    where keeping them would silently change the result.
    """
    if op == hvd.Adasum:
        raise ValueError(
            "op=hvd.Adasum adapts how gradients are combined, and EASGD combines no gradients "
            "(workers step on their own and are pulled toward the center): remove op=, or use "
            "hvd.DistributedOptimizer for Adasum"
        )
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError(f"op={op!r} is not a gradient reduction EASGD can honour; remove op=")
    if process_set is not hvd.global_process_set:
        raise ValueError(
            "process_set is not supported yet: EASGD runs over all workers; remove process_set="
        )
    ignored = {
        "backward_passes_per_step": (backward_passes_per_step, 1,
                                     "gradients accumulate locally; call step() once after "
                                     "your backward passes"),
        "op": (op, hvd.Average, "each worker uses its own gradient; with hvd.Sum you may have "
                                "scaled the learning rate by the number of workers"),
        "gradient_predivide_factor": (gradient_predivide_factor, 1.0, "no gradients are reduced"),
        "num_groups": (num_groups, 0, "every round is already one fused allreduce"),
        "groups": (groups, None, "every round is already one fused allreduce"),
        "sparse_as_dense": (sparse_as_dense, False, "parameters are always exchanged dense"),
    }
    for name, (value, default, why) in ignored.items():
        if value != default:
            warnings.warn(f"hvd_easgd.DistributedOptimizer ignores {name}={value!r}: {why}",
                          stacklevel=2)
    return ElasticOptimizer(
        optimizer, named_parameters, compression=compression, **easgd_kwargs
    )
