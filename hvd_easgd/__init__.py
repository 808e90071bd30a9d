"""hvd-easgd: Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015) on Horovod.

Wrap any ``torch.optim`` optimizer; every ``tau`` steps one fused Horovod allreduce of the
parameters updates each worker's replica of the center variable and pulls the worker toward it.

Two layers: :mod:`hvd_easgd.optim` is the algorithm (the optimizer, its rounds and rules, the
non-finite guard, Horovod Elastic state), :mod:`hvd_easgd.train` the application built on it
(``hvd-easgd-train``, recipes, checkpoints, console, sweeps, plots). ``optim`` never imports
``train``.
"""

from hvd_easgd import _aliases

__version__ = "0.1.0"

_LAZY = {
    "ElasticOptimizer": "hvd_easgd.optim.optimizer",
    "DistributedOptimizer": "hvd_easgd.optim.optimizer",
    "ExchangeStats": "hvd_easgd.optim.exchange",
}


def __getattr__(name):
    # Lazy so that `import hvd_easgd` (config, plotting, models) works without initialising
    # Horovod's native library.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hvd_easgd' has no attribute {name!r}")


_aliases.install()

__all__ = ["ElasticOptimizer", "DistributedOptimizer", "ExchangeStats", "__version__"]
