"""Argument checks of :class:`~hvd_easgd.ElasticOptimizer`, and the check that all workers agree.

Every check raises early, with a message that names the bad value and the fix.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from hvd_easgd.optim.rules import CENTER_AVERAGES, METHODS

DEFAULT_BETA = 0.9
NamedTensors = List[Tuple[str, torch.Tensor]]


def check_integer(name: str, value: Any, minimum: int, meaning: str) -> int:
    """``value`` as an int, or a ValueError naming ``name``, the bound and what it means."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({meaning}), got {value!r}")
    return int(value)


def check_tau(tau: Any) -> int:
    return check_integer("tau", tau, 1, "local steps between communication rounds; the paper "
                                        "uses 1 to 64")


def resolve_coefficients(
    alpha: Optional[float], beta: Optional[float], world_size: int
) -> Tuple[float, float]:
    """``(alpha, beta)`` for ``world_size`` peers from whichever one was given.

    With two or more peers, the paper's symmetric pair ``beta = p * alpha``. With one, the pair
    the elastic force tends to as it has nothing to balance: ``alpha = 0, beta = 1``. The
    center's own term ``rho/2 ||x - c||^2`` is smallest at ``c = x``, and a symmetric force at
    ``p = 1`` makes the center a second particle of equal mass that never computes a gradient:
    ``x + c`` is conserved by every round, so the pair moves at half the worker's speed. A lone
    worker is therefore left alone (plain SGD, bit for bit) and the center takes its value each
    round. Both values are validated as given first, so a bad setting fails at any ``p``.
    """
    if alpha is not None and beta is not None:
        raise ValueError(
            "give either beta (then alpha = beta / p) or alpha (then beta = p * alpha), not both"
        )
    if alpha is not None:
        alpha = check_real("alpha", alpha)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (the elastic coefficient), got {alpha}")
        beta = alpha * world_size
        if beta > 1:
            raise ValueError(
                f"alpha={alpha} with {world_size} workers gives beta = p * alpha = {beta:g} > 1; "
                f"use alpha <= {1 / world_size:g}, or give beta in (0, 1] instead"
            )
        return (0.0, 1.0) if world_size == 1 else (alpha, beta)
    beta = DEFAULT_BETA if beta is None else check_real("beta", beta)
    if not 0 < beta <= 1:
        raise ValueError(
            f"beta must be in (0, 1] (the center's step toward the workers' mean; the paper "
            f"uses 0.9), got {beta}"
        )
    return (0.0, 1.0) if world_size == 1 else (beta / world_size, beta)


def check_sync_sgd_steps(steps: Any) -> int:
    return check_integer("sync_sgd_steps", steps, 0, "synchronous-SGD steps before EASGD "
                                                     "starts; 0 for none")


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value


def check_center_average(kind: Optional[str], rate: float) -> Optional[str]:
    if kind is not None and kind not in CENTER_AVERAGES:
        raise ValueError(
            f"unknown center_average {kind!r}; choose None, {', '.join(map(repr, CENTER_AVERAGES))}"
        )
    if not 0 < rate <= 1:
        raise ValueError(f"center_average_rate must be in (0, 1], got {rate}")
    return kind


def name_parameters(
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


def float_buffers(
    named_buffers: Optional[Iterable[Tuple[str, torch.Tensor]]], named: NamedTensors
) -> NamedTensors:
    if named_buffers is None:
        return []
    buffers = [(n, b) for n, b in named_buffers if b is not None and b.is_floating_point()]
    clash = {n for n, _ in buffers} & {n for n, _ in named}
    if clash:
        raise ValueError(f"buffer names clash with parameter names: {sorted(clash)}")
    return buffers


def signature(named: NamedTensors, buffers: NamedTensors, settings: Dict[str, Any]) -> tuple:
    """What every worker must agree on: its model's tensors and the optimizer's settings."""
    tensors = [("parameter", n, tuple(t.shape), str(t.dtype)) for n, t in named]
    tensors += [("buffer", n, tuple(t.shape), str(t.dtype)) for n, t in buffers]
    return tensors, sorted(settings.items())


def check_signatures(everyone: Sequence[tuple]) -> None:
    """Raise (on every worker alike) naming the first difference between the workers'
    :func:`signature` values, gathered in rank order."""
    ref_tensors, ref_settings = everyone[0]
    for rank, (tensors, settings) in enumerate(everyone[1:], start=1):
        for (key, mine), (_, theirs) in zip(ref_settings, settings):
            if mine != theirs:
                differ = [r for r, (_, s) in enumerate(everyone) if dict(s)[key] != mine]
                raise ValueError(
                    f"workers' EASGD settings differ: {key}={mine!r} on rank 0 but "
                    f"{key}={theirs!r} on rank(s) {differ}. Every worker must wrap its "
                    "optimizer with the same settings (check per-rank arguments and env)."
                )
        for index in range(max(len(ref_tensors), len(tensors))):
            a = ref_tensors[index] if index < len(ref_tensors) else None
            b = tensors[index] if index < len(tensors) else None
            if a != b:
                name = (a or b)[1]
                raise ValueError(
                    f"workers' models differ at {name!r} (tensor #{index}): rank 0 has "
                    f"{_describe(a)}, rank {rank} has {_describe(b)}. Every worker must build the "
                    "same model (architecture, dtype, parameter order) before wrapping its "
                    "optimizer."
                )


def _describe(entry: Optional[tuple]) -> str:
    if entry is None:
        return "nothing there"
    kind, name, shape, dtype = entry
    return f"{kind} {name!r} of shape {list(shape)} and {dtype}"


def check_patience(value: Any) -> int:
    return check_integer("nonfinite_patience", value, 1, "non-finite rounds among the last "
                                                         "2 x nonfinite_patience before training stops")


def check_options(optimizer: Any, wrapper: type, *, method: str, mode: str, modes: Sequence[str],
                  center_average: Optional[str], center_average_rate: float,
                  master_momentum: float, compression: Any) -> None:
    """The wrapped optimizer and the options of :class:`~hvd_easgd.ElasticOptimizer`."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, wrapper):
        raise TypeError("the optimizer is already an ElasticOptimizer; wrap the plain one")
    check_choice("method", method, METHODS)
    check_choice("mode", mode, modes)
    check_center_average(center_average, center_average_rate)
    if not 0.0 <= master_momentum < 1.0:
        raise ValueError(f"master_momentum must be in [0, 1), got {master_momentum}")
    if master_momentum and method != "mdownpour":
        raise ValueError(
            f"master_momentum is MDOWNPOUR's momentum; use method='mdownpour' or drop it "
            f"(method is {method!r})"
        )
    if not (hasattr(compression, "compress") and hasattr(compression, "decompress")):
        raise TypeError("compression must be a Horovod compressor, e.g. hvd.Compression.fp16")
