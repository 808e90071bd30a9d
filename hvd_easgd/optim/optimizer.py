"""The elastic optimizer: EASGD, EAMSGD and the paper's baselines around any torch optimizer.

:class:`ElasticOptimizer` wraps a ``torch.optim.Optimizer``. Every ``tau``-th ``step()`` is a
communication round: one fused Horovod allreduce of the parameters (as differences to the
center) updates every worker's replica of the center variable and pulls the worker toward it.
The replicas receive identical updates, so they stay bit-identical without a parameter server.

The class holds the validated settings, speaks the ``torch.optim`` API and decides *when* a
round happens. A round's life (start, wait or overlap, apply) is in :mod:`hvd_easgd.optim.rounds`,
the math in :mod:`hvd_easgd.optim.rules`, the state a round changes in
:mod:`hvd_easgd.optim.state` (its buffers, state dicts and commits in
:mod:`hvd_easgd.optim.center`), the communication in :mod:`hvd_easgd.optim.exchange` over
:mod:`hvd_easgd.optim.collectives`, NaN/inf workers in :mod:`hvd_easgd.optim.guard`, Horovod
Elastic in :mod:`hvd_easgd.optim.horovod_elastic`, argument checks in
:mod:`hvd_easgd.optim.checks`.

:func:`DistributedOptimizer` is a drop-in for ``hvd.DistributedOptimizer``: change the one call
and an existing Horovod script trains with EASGD.
"""

from __future__ import annotations

import atexit
import itertools
import math
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from hvd_easgd.optim import collectives
from hvd_easgd.optim import hierarchy as hier
from hvd_easgd.optim import horovod_elastic
from hvd_easgd.optim.center import (
    CenterState, adopt_sync_sgd_steps, pack_state_dict, split_state_dict, unpack_state_dict,
    warn_if_saved_elsewhere, Counters,
)
from hvd_easgd.optim.checks import (
    DEFAULT_BETA, check_options, check_patience, check_signatures, check_sync_sgd_steps,
    check_tau, float_buffers, name_parameters, resolve_coefficients, signature,
)
from hvd_easgd.optim.collectives import Compression
from hvd_easgd.optim.exchange import BackgroundExchange, ExchangeStats
from hvd_easgd.optim.flat import group_tensors
from hvd_easgd.optim.guard import NonFiniteGuard
from hvd_easgd.optim.outer import OuterFactory, check_outer_options, describe, nesterov, outer_state
from hvd_easgd.optim.rounds import Rounds
from hvd_easgd.optim.state import RoundState

__all__ = ["ElasticOptimizer", "DistributedOptimizer", "DEFAULT_BETA", "MODES"]

MODES = ("sync", "async")

# Every worker constructs its optimizers in the same order, so this numbering (used in Horovod
# tensor names) agrees across workers and keeps two optimizers' rounds apart.
_instance_ids = itertools.count()


def _local(name: str) -> property:
    """The local optimizer's ``name``, read through: LR schedulers and
    ``hvd.broadcast_optimizer_state`` edit it in place, and loading a state dict into the local
    optimizer replaces it. torch's ``Optimizer.__init__`` assigns it once, which is ignored."""

    def get(self: "ElasticOptimizer") -> Any:
        return getattr(self.optimizer, name)

    def set_(self: "ElasticOptimizer", value: Any) -> None:
        if self.__dict__.get("_constructed", False):
            raise AttributeError(f"{name} is the local optimizer's: set opt.optimizer.{name}")

    return property(get, set_, doc=f"The local optimizer's ``{name}``.")


class ElasticOptimizer(torch.optim.Optimizer):
    """Elastic Averaging SGD around a local optimizer (Zhang, Choromanska & LeCun, 2015).

    Args:
        optimizer: the local optimizer, e.g. ``torch.optim.SGD(..., momentum=0.99,
            nesterov=True)`` for EAMSGD, or Adam. It keeps its own per-worker state.
        named_parameters: ``model.named_parameters()``; names appear in errors, Horovod tensor
            names and :meth:`center_state_dict`. Without it parameters are named by position.
        tau: local steps per communication round (a round at steps tau, 2*tau, ...).
        beta: the center's moving rate, in (0, 1]; ``alpha = beta / hvd.size()``. Default 0.9
            (the paper's value) when ``alpha`` is not given. Under Horovod Elastic, alpha
            follows the new number of workers at every reset.
        alpha: the elastic coefficient instead of ``beta`` (then ``beta = p * alpha``). Under
            Horovod Elastic alpha stays fixed and beta follows p; a reset to so many workers
            that ``p * alpha > 1`` raises.
        method: ``"easgd"``, ``"downpour"``, ``"mdownpour"``, ``"average"`` (local SGD) or
            ``"diloco"``; see :mod:`hvd_easgd.optim.rules` and :mod:`hvd_easgd.optim.outer` for the
            exact rules. ``"diloco"`` takes no ``alpha``/``beta``: its center moves by
            ``outer_optimizer`` (default Nesterov SGD, lr 0.7, momentum 0.9) and every worker
            restarts from the center after each round.
        mode: ``"sync"`` applies each round at once; ``"async"`` waits for the round's
            allreduce on a background thread and applies it at the next round (``tau`` steps
            later) or at :meth:`synchronize`, so training does not wait for communication.
            With a single worker (``hvd.size() == 1``, e.g. after Horovod Elastic lost the
            others) there is nothing to hide and async rounds apply at once.
        start_early: in sync mode, start an EASGD round's allreduce when the step before the
            round step returns (the parameters it sends are final then), so that it runs
            behind the next forward and backward. The parameters' math is unchanged; averaged
            buffers are sent as they were before the round step's forward. Set it to ``False``
            if your code changes the parameters between ``step()`` calls through ``.data``
            (in-place edits are detected and warned about). See
            :meth:`hvd_easgd.optim.rounds.Rounds.start_early`.
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
        nonfinite_patience: a round in which some worker's contribution is NaN/inf is applied
            by nobody, and those workers restart from the center with fresh optimizer state;
            when this many of the last ``2 * nonfinite_patience`` rounds were such rounds,
            every worker raises :class:`~hvd_easgd.optim.guard.NonFiniteError`.
        outer_optimizer: a factory ``params -> torch.optim.Optimizer`` that moves the center
            (``method="easgd"`` or ``"diloco"``), e.g. ``lambda params: torch.optim.SGD(params,
            lr=0.7, momentum=0.9, nesterov=True)``; it is called with the center's tensors and
            stepped with the outer gradient ``c - mean_i x_i``. Its state travels in
            :meth:`state_dict` and Horovod Elastic commits; it is ``opt.outer_optimizer`` (for
            an LR scheduler). Default: EASGD's own rule (``c += beta * (mean_i x_i - c)``).
        hierarchy: ``"host"`` or lists of global ranks (``[[0, 1], [2, 3]]``): the workers of
            a group (a node) train as one synchronous-SGD worker (gradients averaged over the
            group every step), and the groups do EASGD rounds with ``alpha = beta / groups``,
            each worker exchanging a 1/n slice of the round; see :mod:`hvd_easgd.optim.hierarchy`.
            Needs Horovod process sets (``hvd.init(process_sets="dynamic")``).
        process_set: a registered ``hvd.ProcessSet``: EASGD among its members only (construct
            the optimizer on the members alone).
        check_consistency: check that every worker has the same parameter names, shapes,
            dtypes and EASGD settings (one small allgather at construction, or at the first
            Horovod Elastic sync).
        sync_sgd_steps: train with synchronous SGD for this many steps first (gradients averaged
            over the workers every step, exactly as ``hvd.DistributedOptimizer``; the center
            follows the identical workers), then with EASGD, the first round ``tau`` steps
            after the switch. Like torch's post-local SGD (``start_localSGD_iter``): early
            training, where the loss falls fastest, gets synchronous SGD's speed. The switch
            point travels in :meth:`state_dict` and Horovod Elastic syncs. Default 0.
        survivors: what the workers that stay through a Horovod Elastic membership change
            train on: ``"own"`` (their own last committed parameters, so no local progress is
            thrown away) or ``"center"`` (every worker restarts from the center). A worker
            that joins always starts from the center.

    Memory: the center (1x the synchronised tensors), one round buffer in sync mode and two in
    async mode, plus one output for the round on the wire, kept from round to round (no
    allocation per round, :mod:`hvd_easgd.optim.exchange`): about 3x the parameter
    bytes in sync mode, 4x in async mode. A Horovod Elastic commit keeps 2x more (see
    :mod:`hvd_easgd.optim.horovod_elastic`).
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
        compression: Any = Compression.none,
        named_buffers: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
        center_average: Optional[str] = None,
        center_average_rate: float = 0.001,
        master_momentum: float = 0.0,
        nonfinite_patience: int = 3,
        check_consistency: bool = True,
        outer_optimizer: Optional[OuterFactory] = None,
        hierarchy: Any = None,
        process_set: Any = None,
        start_early: bool = True,
        sync_sgd_steps: int = 0,
        survivors: str = "own",
    ) -> None:
        check_outer_options(method, outer_optimizer, alpha, beta)
        check_options(optimizer, ElasticOptimizer, method=method, mode=mode, modes=MODES,
                      center_average=center_average, center_average_rate=center_average_rate,
                      master_momentum=master_momentum, compression=compression)
        self.tau = check_tau(tau)
        self._coefficients = (alpha, beta)
        self.topology = hier.resolve(hierarchy, process_set, horovod_elastic.elastic_launch())
        resolve_coefficients(alpha, beta, hier.peers(self.topology))  # raises early on a bad value
        self.method, self.mode, self.center_average = method, mode, center_average
        self.center_average_rate = float(center_average_rate)
        self.master_momentum = float(master_momentum)
        self.nonfinite_patience = check_patience(nonfinite_patience)
        self.check_consistency = bool(check_consistency)
        self.start_early = bool(start_early)
        sync_sgd_steps = check_sync_sgd_steps(sync_sgd_steps)
        self.survivors = horovod_elastic.check_survivors(survivors)

        named = name_parameters(optimizer, named_parameters)
        buffers = float_buffers(named_buffers, named)
        self.optimizer = optimizer
        super().__init__([{"params": [p for _, p in named]}], {})
        self._constructed = True

        self._signature_tensors = (named, buffers)
        self.groups = group_tensors(named, buffers)
        if outer_optimizer is None and method == "diloco":
            outer_optimizer = nesterov()
        center = CenterState(self.groups, velocity=method == "mdownpour",
                             average=center_average is not None,
                             slots=2 if mode == "async" else 1, outer=outer_optimizer)
        self.outer_optimizer = center.outer
        self.stats = ExchangeStats()
        self.communicator = hier.make_communicator(
            self.topology, compression, f"hvd_easgd.{next(_instance_ids)}", self.stats)
        # Under Horovod Elastic, collectives here could deadlock a joining worker against the
        # others' state sync: the first hvd.elastic sync does the check and the broadcast.
        self.round_state = RoundState(
            center, self.stats, method=method, coefficients=(alpha, beta),
            master_momentum=self.master_momentum, topology=self.topology,
            sync_sgd_steps=sync_sgd_steps, synced=not horovod_elastic.elastic_launch())
        guard = NonFiniteGuard(self.round_state, optimizer, self.nonfinite_patience,
                               self.topology, self.communicator.name)
        self.rounds = Rounds(
            self.round_state, optimizer, self.communicator,
            BackgroundExchange(self.communicator) if mode == "async" else None, guard,
            hier.peer_set(self.topology), center_average=center_average,
            center_average_rate=self.center_average_rate, start_early=self.start_early)
        self._closed = False
        if self.round_state.synced:
            self._start_together(named + buffers)
        center.reset_from_live()
        self._at_exit = _close_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)

    param_groups = _local("param_groups")
    state = _local("state")
    defaults = _local("defaults")

    def _start_together(self, tensors: List[Tuple[str, torch.Tensor]]) -> None:
        """Check that every peer runs the same model and settings, and start them all from the
        lowest rank's values (outside Horovod Elastic, whose first sync does this)."""
        if self.topology is not None and self.topology.group_set is None:
            hier.start_workers(self.topology, [t for _, t in tensors], self.signature(),
                               self.communicator.name)  # EASGD among a process set's members
            return
        if self.check_consistency:
            check_signatures(collectives.allgather_object(
                self.signature(), name=f"{self.communicator.name}.check"))
        collectives.broadcast_parameters(tensors, root_rank=0)

    def settings(self) -> Dict[str, Any]:
        """The settings every worker must share (compared by the consistency check)."""
        alpha, beta = self._coefficients
        return {
            "tau": self.tau, "method": self.method, "mode": self.mode,
            "alpha": alpha, "beta": beta, "center_average": self.center_average,
            "center_average_rate": self.center_average_rate,
            "master_momentum": self.master_momentum,
            "compression": getattr(self.communicator.compression, "__name__",
                                   type(self.communicator.compression).__name__),
            "nonfinite_patience": self.nonfinite_patience,
            "outer_optimizer": describe(self.outer_optimizer),
            "hierarchy": None if self.topology is None else self.topology.describe(),
            "sync_sgd_steps": self.sync_sgd_steps, "survivors": self.survivors,
        }

    def signature(self) -> tuple:
        """What every worker must agree on: its model's tensors and :meth:`settings`."""
        return signature(*self._signature_tensors, self.settings())

    @property
    def alpha(self) -> float:
        """The elastic coefficient for the current number of workers (``beta / p``)."""
        return self.round_state.coefficients[0]

    @property
    def beta(self) -> float:
        """The center's moving rate for the current number of workers (``p * alpha``)."""
        return self.round_state.coefficients[1]

    @property
    def sync_sgd_steps(self) -> int:
        """Synchronous-SGD steps before EASGD (a state dict or a resync may change it)."""
        return self.round_state.sync_sgd_steps

    @property
    def synced(self) -> bool:
        """Whether the workers started from one agreed state (under Horovod Elastic: whether
        its first sync has run)."""
        return self.round_state.synced

    # ------------------------------------------------------------------ the algorithm

    @property
    def step_count(self) -> int:
        """Calls of :meth:`step` so far (including those restored from a state dict)."""
        return self.round_state.step

    @property
    def round_count(self) -> int:
        """Communication rounds started so far."""
        return self.round_state.round

    @property
    def in_sync_sgd(self) -> bool:
        """Whether the next :meth:`step` is a synchronous-SGD step (EASGD has not started yet)."""
        return self.round_state.in_sync_sgd

    def round_due(self, step: int) -> bool:
        """Whether step number ``step`` (1-based) ends with a round: every ``tau`` steps,
        counted from the end of the synchronous-SGD steps."""
        return step > self.sync_sgd_steps and (step - self.sync_sgd_steps) % self.tau == 0

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One local optimizer step; at every ``tau``-th step, also a communication round."""
        self._raise_if_failed()
        horovod_elastic.follow_world(self.round_state, self.rounds)
        if self.in_sync_sgd:
            loss = self.rounds.sync_sgd_step(closure, self._params())
        else:
            self._average_group_gradients(closure)
            self.round_state.count_step()
            due = self.round_due(self.step_count)
            loss = self.rounds.run(closure) if due else self.optimizer.step(closure)
        if self.round_due(self.step_count + 1):
            self.rounds.start_early()
        return loss

    def _average_group_gradients(self, closure: Optional[Callable[[], float]]) -> None:
        """``hierarchy=``: the workers of a group train as one synchronous-SGD worker."""
        if self.topology is None or self.topology.group_set is None:
            return
        if closure is not None:
            raise ValueError("step(closure) with hierarchy=: compute the gradients before "
                             "step() (they are averaged over the group first); drop closure")
        hier.reduce_gradients(self.topology, self._params(), self.stats,
                              f"{self.communicator.name}.grads")

    def synchronize(self) -> None:
        """Wait for the round in flight and apply it (async mode); a no-op in sync mode.

        Call it before evaluating or saving the center. Every worker must call it at the same
        step, as with any collective.
        """
        self._raise_if_failed()
        if self.rounds.in_flight:
            self.rounds.finish()

    def _raise_if_failed(self) -> None:
        if self._closed:
            raise RuntimeError("this ElasticOptimizer was closed; create a new one to go on")
        if not self.synced:
            raise RuntimeError(horovod_elastic.NOT_SYNCED)
        self.rounds.raise_if_failed()

    # ------------------------------------------------------------------ results

    def center_state_dict(self) -> Dict[str, torch.Tensor]:
        """``{name: tensor}`` of the center: every parameter and every averaged buffer.

        Load it with ``model.load_state_dict(opt.center_state_dict(), strict=False)``. The
        tensors are live views of the center (clone them to keep a copy); in async mode call
        :meth:`synchronize` first to include the round in flight.
        """
        center = self.round_state.center
        return center.named_views(center.center_views)

    def averaged_center_state_dict(self) -> Dict[str, torch.Tensor]:
        """Like :meth:`center_state_dict`, for the running/moving average of the center."""
        center = self.round_state.center
        if center.average_views is None:
            raise ValueError(
                "no averaged center is kept: create the optimizer with "
                "center_average='running' or 'moving'"
            )
        return center.named_views(center.average_views)

    @torch.no_grad()
    def local_distance(self) -> float:
        """``||x - c||_2`` over the parameters: how far this worker has wandered."""
        total = 0.0
        for group, views in zip(self.groups, self.round_state.center.center_views):
            k = group.num_params
            if k:
                diffs = torch._foreach_sub(group.tensors[:k], views[:k])
                total += float(sum(float(n) ** 2 for n in torch._foreach_norm(diffs)))
        return math.sqrt(total)

    # ------------------------------------------------------------------ torch.optim API

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not self.__dict__.get("_constructed", False):
            return  # torch's Optimizer.__init__: the groups are the local optimizer's already
        raise NotImplementedError(
            "the center is laid out at construction: add every param group to the local "
            "optimizer before wrapping it in ElasticOptimizer"
        )

    def state_dict(self) -> Dict[str, Any]:
        """The local optimizer's state dict plus the center and the counters.

        See :func:`hvd_easgd.optim.center.pack_state_dict`. In async mode the round in flight is
        applied first, so a checkpoint never loses a round.
        """
        self.synchronize()
        settings = {"method": self.method, "mode": self.mode, "tau": self.tau,
                    "alpha": self.alpha, "beta": self.beta,
                    "world_size": self.round_state.size, "sync_sgd_steps": self.sync_sgd_steps}
        sd = pack_state_dict(self.optimizer.state_dict(), self.round_state.center,
                             self._params(), self.round_state.counters, settings)
        if self.outer_optimizer is not None:
            sd["easgd"]["outer"] = outer_state(self.outer_optimizer)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the local optimizer, the center and the counters saved by :meth:`state_dict`.

        A state dict of the plain local optimizer (no EASGD entries) loads with a warning: the
        center restarts from the current parameters, so load the same model weights on every
        worker first.
        """
        self.synchronize()
        self.rounds.settle_early()  # it sent the values replaced here
        base, ours, easgd = split_state_dict(state_dict)
        self.optimizer.load_state_dict(base)
        params, state = self._params(), self.round_state
        if easgd is None or len(ours) != len(params):
            warnings.warn(
                "the state dict has no EASGD center or counters (saved from the plain "
                "optimizer?): the center restarts from the current parameters and the step "
                "counter from 0. Load the same model weights on every worker before this call.",
                stacklevel=2,
            )
            state.center.reset_from_live()
            state.restore_counters(Counters())
            return
        state.restore_counters(unpack_state_dict(state.center, params, ours, easgd))
        state.adopt_sync_sgd_steps(adopt_sync_sgd_steps(easgd, self.sync_sgd_steps))
        if self.outer_optimizer is not None and easgd.get("outer") is not None:
            self.outer_optimizer.load_state_dict(easgd["outer"])
        warn_if_saved_elsewhere(easgd, state.size, self.method, self.alpha)

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Finish the round in flight (applying it) and stop the background exchange.

        Called by ``with ElasticOptimizer(...) as opt:`` and at interpreter exit; safe to call
        more than once. A round that failed is reported as a warning here, not raised.
        """
        if self._closed:
            return
        try:
            self.rounds.close(apply_in_flight=self.synced)
        except Exception as error:  # noqa: BLE001 - closing must not hang or mask the cause
            warnings.warn(f"the last EASGD round failed while closing: {error!r}")
        finally:
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


# ---------------------------------------------------------------------- Horovod drop-in


def DistributedOptimizer(  # noqa: N802 - mirrors hvd.DistributedOptimizer
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    op: Any = collectives.AVERAGE,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: Any = collectives.GLOBAL_SET,
    **easgd_kwargs: Any,
) -> ElasticOptimizer:
    """A drop-in for ``hvd.DistributedOptimizer`` that trains with EASGD.

    Takes Horovod's arguments plus :class:`ElasticOptimizer`'s keywords (``tau``, ``beta``,
    ``method``, ``mode``, ...). EASGD exchanges parameters, not gradients, so the arguments that
    shape the gradient allreduce have no effect: they are accepted with a warning, and refused
    where keeping them would silently change the result.
    """
    if op == collectives.ADASUM:
        raise ValueError(
            "op=hvd.Adasum adapts how gradients are combined, and EASGD combines no gradients "
            "(workers step on their own and are pulled toward the center): remove op=, or use "
            "hvd.DistributedOptimizer for Adasum"
        )
    if op not in (collectives.AVERAGE, collectives.SUM):
        raise ValueError(f"op={op!r} is not a gradient reduction EASGD can honour; remove op=")
    ignored = {
        "backward_passes_per_step": (backward_passes_per_step, 1,
                                     "gradients accumulate locally; call step() once after "
                                     "your backward passes"),
        "op": (op, collectives.AVERAGE, "each worker uses its own gradient; with hvd.Sum you may have "
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
    if process_set is not collectives.GLOBAL_SET:
        easgd_kwargs["process_set"] = process_set  # EASGD among the set's members
    return ElasticOptimizer(
        optimizer, named_parameters, compression=compression, **easgd_kwargs
    )


horovod_elastic.register_state_handler(ElasticOptimizer)
