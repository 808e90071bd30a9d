"""The algorithm: EASGD and its baselines as a ``torch.optim`` wrapper over Horovod collectives.

A round of EASGD reads in three files: :mod:`~hvd_easgd.optim.optimizer` decides when a round
happens, :mod:`~hvd_easgd.optim.rounds` runs it (start, wait or overlap, apply) and
:mod:`~hvd_easgd.optim.rules` holds the math. The state a round changes has one owner
(:mod:`~hvd_easgd.optim.state`); NaN/inf workers are :mod:`~hvd_easgd.optim.guard`'s, Horovod
Elastic's state handler :mod:`~hvd_easgd.optim.horovod_elastic`'s, and every collective goes
through :mod:`~hvd_easgd.optim.collectives`. Nothing here imports :mod:`hvd_easgd.train`.

The names below are this layer's public surface: the trainer and the benchmarks import them
from ``hvd_easgd.optim``, never from the modules, so the modules can move. Lazy, so that
importing a name that needs no Horovod (a check, a constant) does not load Horovod.
"""

import importlib

#: public name -> the module that defines it
_EXPORTS = {
    "ElasticOptimizer": "optimizer",
    "DistributedOptimizer": "optimizer",
    "MODES": "optimizer",
    "METHODS": "rules",
    "CENTER_AVERAGES": "rules",
    "ExchangeStats": "exchange",
    "NonFiniteError": "guard",
    "NonFiniteWarning": "guard",
    "elastic_launch": "horovod_elastic",
    "nesterov": "outer",
    "OUTER_METHODS": "outer",
    "check_group_shape": "hierarchy",
    "check_groups": "hierarchy",
    "HOROVOD_SETTINGS": "tuning",
    "apply_horovod_settings": "tuning",
    "effective_settings": "tuning",
    "late_recipe_warning": "tuning",
    "recipe_settings": "tuning",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
