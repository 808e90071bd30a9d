"""The algorithm: EASGD and its baselines as a ``torch.optim`` wrapper over Horovod collectives.

A round of EASGD reads in three files: :mod:`~hvd_easgd.optim.optimizer` decides when a round
happens, :mod:`~hvd_easgd.optim.rounds` runs it (start, wait or overlap, apply) and
:mod:`~hvd_easgd.optim.rules` holds the math. Nothing here imports :mod:`hvd_easgd.train`.
"""
