"""The application on top of :mod:`hvd_easgd.optim`, one way down: the command line
(:mod:`~hvd_easgd.train.cli`) builds the parts from a recipe (:mod:`~hvd_easgd.train.config`,
data, models), runs the trainer loop (:mod:`~hvd_easgd.train.trainer`) and records what happens
(checkpoints, console, metrics); sweeps and plots sit beside it.

``python -m hvd_easgd.train`` is ``hvd-easgd-train``.
"""


def __getattr__(name):
    # `hvd_easgd.train:main` was the console script's target before the package split: an old
    # installation's script still finds it.
    if name == "main":
        from hvd_easgd.train.cli import main

        return main
    raise AttributeError(f"module 'hvd_easgd.train' has no attribute {name!r}")
