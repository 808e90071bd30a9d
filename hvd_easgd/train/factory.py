"""The parts of a run, built from its config: device, data, model, optimizer and learning-rate
schedule (in the spirit of timm's ``create_model`` / ``create_optimizer_v2`` /
``create_loader``).

:func:`create_parts` builds everything a :class:`~hvd_easgd.train.trainer.Trainer` trains with;
the command line calls it and hands the result to the trainer. Algorithm names come from
:mod:`hvd_easgd.optim` only.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from hvd_easgd.train.config import (
    ELASTIC_METHODS, SINGLE_WORKER_METHODS, SYNC_METHOD, ConfigError, DictConfig, parse_hierarchy,
)
from hvd_easgd.train.console import warn_on_rank0
from hvd_easgd.train.data import DataBundle, build_datasets, eval_loader, train_loader
from hvd_easgd.train.models import build_model
from hvd_easgd.train.trainer import Parts


def lr_at(cfg: DictConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate for the step numbered `step` (1-based), from `optimizer.lr` and its schedule.

    Epoch-valued settings (warmup_epochs, milestones) are converted with the steps per epoch, so
    they mean the same whatever the number of workers.
    """
    s = cfg.optimizer.schedule
    base = float(cfg.optimizer.lr)
    t = step - 1  # steps completed before this one
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if warmup > 0 and t < warmup:
        f0 = s.warmup_start_factor
        return base * (f0 + (1.0 - f0) * t / warmup)
    if s.name == "constant":
        return base
    if s.name == "step":
        passed = sum(1 for m in s.milestones if t >= int(round(m * steps_per_epoch)))
        return base * (s.gamma ** passed)
    # cosine, from the end of warm-up to total_steps
    span = max(1, total_steps - warmup)
    frac = min(1.0, max(0.0, (t - warmup) / span))
    return s.min_lr + (base - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def create_device(cfg: DictConfig, local_rank: int) -> torch.device:
    """``train.device``: the CPU, or this worker's GPU (one per worker, by local rank)."""
    want = cfg.train.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is visible to this worker")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def create_datasets(cfg: DictConfig) -> DataBundle:
    """The datasets of `cfg.data` (checked: a missing path is a clear error)."""
    d = cfg.data
    return build_datasets(
        d.name, root=d.root, download=d.download, image_size=d.image_size, augment=d.augment,
        fake_train_size=d.fake_train_size, fake_test_size=d.fake_test_size,
        fake_image_shape=tuple(d.fake_image_shape), fake_num_classes=d.fake_num_classes,
    )


def create_loaders(cfg: DictConfig, data: DataBundle, rank: int, size: int) -> Tuple[Any, Any]:
    """(training loader, test loader) of worker `rank`'s shards in a world of `size` workers;
    a single-worker method trains every worker on the whole training set."""
    t = cfg.train
    if cfg.optimizer.method in SINGLE_WORKER_METHODS:
        rank, size = 0, 1
    train = train_loader(data.train, t.batch_size, rank=rank, world_size=size, seed=t.seed,
                         num_workers=cfg.data.num_workers)
    test = eval_loader(data.test, t.eval_batch_size, rank=rank, world_size=size,
                       num_workers=cfg.data.num_workers)
    return train, test


def create_model(cfg: DictConfig, data: DataBundle, device: torch.device) -> nn.Module:
    """`model.name` for `data`, seeded by ``train.init_seed`` (else ``train.seed``), so every
    worker starts from the same weights."""
    torch.manual_seed(cfg.train.seed if cfg.train.init_seed is None else cfg.train.init_seed)
    in_channels, image_size = data.input_shape[0], data.input_shape[-1]
    return build_model(cfg.model.name, data.num_classes, in_channels=in_channels,
                       image_size=image_size, dropout=cfg.model.dropout).to(device)


def create_local_optimizer(cfg: DictConfig, model: nn.Module, nesterov: bool) -> torch.optim.Optimizer:
    """The optimizer each worker steps with: SGD (Nesterov momentum ``optimizer.momentum`` when
    `nesterov`) or, with ``optimizer.local_optimizer: adamw``, AdamW."""
    o = cfg.optimizer
    if o.local_optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=float(o.lr), weight_decay=float(o.weight_decay))
    momentum = float(o.momentum) if nesterov else 0.0
    return torch.optim.SGD(model.parameters(), lr=float(o.lr), momentum=momentum,
                           nesterov=nesterov and momentum > 0, weight_decay=float(o.weight_decay))


def elastic_options(cfg: DictConfig, model: nn.Module) -> Dict[str, Any]:
    """The keyword arguments of ``hvd_easgd.optim.ElasticOptimizer`` for `optimizer.method`."""
    from hvd_easgd.optim import nesterov as outer_nesterov

    o = cfg.optimizer
    method, _, center_average = ELASTIC_METHODS[o.method]
    kwargs: Dict[str, Any] = dict(
        named_parameters=model.named_parameters(), tau=int(o.tau), method=method, mode=o.mode,
        compression=compression(cfg), nonfinite_patience=int(o.nonfinite_patience),
        start_early=bool(o.start_early), sync_sgd_steps=int(o.sync_sgd_steps),
        survivors=str(o.survivors),
    )
    if method == "diloco":
        kwargs["outer_optimizer"] = outer_nesterov(float(o.outer_lr), float(o.outer_momentum))
    elif o.alpha is not None:
        kwargs.update(alpha=float(o.alpha), beta=None)
    else:
        kwargs.update(beta=float(o.beta))
    if method == "mdownpour":
        kwargs["master_momentum"] = float(o.momentum)
    if center_average is not None:
        kwargs["center_average"] = center_average
        if center_average == "moving":
            kwargs["center_average_rate"] = float(o.moving_rate)
    if o.average_buffers and any(b.is_floating_point() for b in model.buffers()):
        kwargs["named_buffers"] = model.named_buffers()
    if o.hierarchy is not None:
        kwargs["hierarchy"] = parse_hierarchy(o.hierarchy)
    return kwargs


def compression(cfg: DictConfig):
    """Horovod's compression for ``optimizer.compression``."""
    import horovod.torch as hvd

    return hvd.Compression.fp16 if cfg.optimizer.compression == "fp16" else hvd.Compression.none


def create_optimizer(cfg: DictConfig, model: nn.Module, rank: int) -> Tuple[Any, str]:
    """(optimizer, kind) for `optimizer.method`, kind 'elastic' | 'sync' | 'solo': the elastic
    methods wrap the local optimizer in ``hvd_easgd.optim.ElasticOptimizer``, sync_sgd in
    Horovod's ``DistributedOptimizer``; the single-worker methods use it alone."""
    import horovod.torch as hvd

    from hvd_easgd.optim import ElasticOptimizer, elastic_launch

    o = cfg.optimizer
    if o.method in SINGLE_WORKER_METHODS:
        return create_local_optimizer(cfg, model, o.method == "msgd"), "solo"
    if o.method == SYNC_METHOD:
        if o.mode != "sync":
            warn_on_rank0("optimizer.mode is ignored for sync_sgd (Horovod's DistributedOptimizer)", rank)
        base = create_local_optimizer(cfg, model, float(o.momentum) > 0)
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                       compression=compression(cfg))
        # Only the parameters: the optimizer state is empty everywhere (and Horovod's
        # broadcast_optimizer_state would take a spurious zero-gradient step to create it).
        # Under an elastic launch the first elastic sync broadcasts them (a collective here
        # would deadlock a worker that joins against the others' sync).
        if not elastic_launch():
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return opt, "sync"
    nesterov = ELASTIC_METHODS[o.method][1]
    return ElasticOptimizer(create_local_optimizer(cfg, model, nesterov),
                            **elastic_options(cfg, model)), "elastic"


def create_parts(cfg: DictConfig, *, rank: int, size: int, local_rank: int,
                 resume_state: Optional[dict] = None) -> Parts:
    """Everything the trainer trains with. The same initial weights everywhere (seeded; the
    elastic optimizer also broadcasts rank 0's). Resuming with another number of workers than
    the checkpoint's starts every worker from the checkpoint's center (a warning says what is
    dropped)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(int(cfg.train.threads))
    device = create_device(cfg, local_rank)
    data = create_datasets(cfg)
    model = create_model(cfg, data, device)
    if resume_state is not None and int(resume_state["world_size"]) != size:
        warn_on_rank0(f"resuming a run of {resume_state['world_size']} workers with {size}: "
                      f"every worker restarts from the center with a fresh local optimizer "
                      f"(local models, optimizer state and RNG streams of the old workers are "
                      f"dropped)", rank)
        model.load_state_dict(resume_state["center"])
    opt, kind = create_optimizer(cfg, model, rank)
    return Parts(device=device, data=data, model=model, optimizer=opt, kind=kind,
                 loaders=partial(create_loaders, cfg, data), lr_at=partial(lr_at, cfg))
