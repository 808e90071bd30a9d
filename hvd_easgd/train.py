"""The training entry point: `hvd-easgd-train` (also `python -m hvd_easgd.train`).

    horovodrun -np 4 -H localhost:4 hvd-easgd-train --config recipes/cifar10/eamsgd_p4_tau16.yaml \
        --set optimizer.lr=0.01 --set train.epochs=5

`run(cfg) -> dict` does the work and can be called in-process (several times in one Horovod job);
`main(argv)` is the thin command line around it.

What a run does, on every worker:
1. builds the datasets and its shard of the training set, the model (same seed everywhere; the
   elastic optimizer then broadcasts rank 0's parameters, so all workers and the center start from
   the same point) and the optimizer of `optimizer.method`;
2. trains for `train.max_steps` steps (or `train.epochs` passes over its shard), setting the
   learning rate of the schedule before each step;
3. every `log.every` steps averages the training loss (and the distance to the center) over the
   workers and logs it with the communication counters; every `train.eval_every` steps and at the
   end evaluates the center (in a separate copy of the model) and the local model on the test set,
   summing correct predictions and counts over workers; every `checkpoint.every` steps and at the end
   writes a checkpoint; at the end exports the center as `center.pt`.

Time: `wall_time` in the logs is the seconds of training since the run started (data loading,
forward, backward, optimizer steps and communication), excluding set-up, evaluation, logging
reductions and checkpoint writing, and continued across `--resume` from the checkpoint's value.
It is measured on rank 0.

Checkpoints (rank 0 writes them; see hvd_easgd/checkpoint.py for the atomic write): the center,
every worker's parameters, optimizer state (with the EASGD center and step/round counters), RNG
states (torch, numpy, python) and loss accumulator, gathered from all workers; the data position
(epoch, samples consumed this epoch), the step, the samples, `wall_time`, the communication
counters and the resolved config. `--resume` (run(..., resume=True)) continues from the newest
checkpoint that loads; every worker reads it itself when it sees the same file (shared file system)
and otherwise gets rank 0's copy (set HVD_EASGD_RESUME_BROADCAST=1 to always do that). With another
number of workers than the checkpoint's, every worker restarts from the center with a fresh local
optimizer and RNG streams, at the same fraction of the epoch (a warning says so).

Exact resume: a resumed run reproduces the uninterrupted run bit for bit (same hardware, same number
of workers, `data.num_workers: 0`) because the checkpoint holds each worker's parameters, optimizer
state (with the center and the step/round counters), RNG states and data position, and evaluation
runs under a forked RNG. In async mode, evaluating or checkpointing calls `opt.synchronize()`, which
applies the round in flight early: evaluation and checkpoint steps are then part of the trajectory,
and a resumed run equals the uninterrupted run with the same `train.eval_every` and
`checkpoint.every`.

Methods (`optimizer.method`): easgd (local SGD steps), eamsgd (local Nesterov momentum
`optimizer.momentum`), downpour, mdownpour (master momentum `optimizer.momentum`), average
(periodic averaging), adownpour / mvadownpour (downpour; the evaluated and exported model is the
running / moving (`optimizer.moving_rate`) average of the center) all wrap the local
`torch.optim.SGD` in `hvd_easgd.ElasticOptimizer`; sync_sgd is Horovod's `hvd.DistributedOptimizer`
(Nesterov momentum `optimizer.momentum`, 0 for plain SGD); sgd / msgd train one model per worker
without communication (meant for `-np 1`; with more workers each trains alone on the whole
training set and rank 0 reports).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from hvd_easgd import checkpoint as ckpt
from hvd_easgd.config import (
    SINGLE_WORKER_METHODS, ConfigError, DictConfig, config_from_dict, diff_configs, load_config,
    save_config, to_dict,
)
from hvd_easgd.metrics import MetricsLogger, Progress, Stopwatch, allreduce_sum

#: optimizer.method -> (wrapper method, local optimizer has Nesterov momentum, center average)
ELASTIC = {
    "easgd": ("easgd", False, None),
    "eamsgd": ("easgd", True, None),
    "downpour": ("downpour", False, None),
    "mdownpour": ("mdownpour", False, None),
    "average": ("average", False, None),
    "adownpour": ("downpour", False, "running"),
    "mvadownpour": ("downpour", False, "moving"),
}


class TrainingStopped(Exception):
    """Raised by `run(..., stop_at_step=N)` after step N (a simulated preemption, for tests)."""


def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(f"[hvd-easgd] {msg}", file=sys.stderr, flush=True)


def _warn(msg: str, rank: int) -> None:
    if rank == 0:
        warnings.warn(msg, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


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


def _device(cfg: DictConfig, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is visible to this worker")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _float_buffers(model: nn.Module):
    return [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def build_optimizer(cfg: DictConfig, model: nn.Module, world_size: int, rank: int):
    """(optimizer, kind) with kind 'elastic' | 'sync' | 'solo'."""
    import horovod.torch as hvd

    o = cfg.optimizer
    method = o.method
    compression = hvd.Compression.fp16 if o.compression == "fp16" else hvd.Compression.none

    def sgd(nesterov: bool):
        momentum = float(o.momentum) if nesterov else 0.0
        return torch.optim.SGD(
            model.parameters(), lr=float(o.lr), momentum=momentum,
            nesterov=nesterov and momentum > 0, weight_decay=float(o.weight_decay),
        )

    if method in SINGLE_WORKER_METHODS:
        return sgd(method == "msgd"), "solo"
    if method == "sync_sgd":
        if o.mode != "sync":
            _warn("optimizer.mode is ignored for sync_sgd (Horovod's DistributedOptimizer)", rank)
        base = sgd(float(o.momentum) > 0)
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression=compression)
        # Only the parameters: the optimizer state is empty everywhere (and Horovod's
        # broadcast_optimizer_state would take a spurious zero-gradient step to create it).
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return opt, "sync"

    import hvd_easgd

    wrapper_method, nesterov, center_average = ELASTIC[method]
    kwargs: Dict[str, Any] = dict(
        named_parameters=model.named_parameters(), tau=int(o.tau), method=wrapper_method,
        mode=o.mode, compression=compression,
    )
    if o.alpha is not None:
        kwargs.update(alpha=float(o.alpha), beta=None)
    else:
        kwargs.update(beta=float(o.beta))
    if wrapper_method == "mdownpour":
        kwargs["master_momentum"] = float(o.momentum)
    if center_average is not None:
        kwargs["center_average"] = center_average
        if center_average == "moving":
            kwargs["center_average_rate"] = float(o.moving_rate)
    if o.average_buffers and _float_buffers(model):
        kwargs["named_buffers"] = model.named_buffers()
    return hvd_easgd.ElasticOptimizer(sgd(nesterov), **kwargs), "elastic"


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _seed_worker_rng(seed: int, rank: int, step: int) -> None:
    import random

    import numpy as np

    s = (int(seed) * 1_000_003 + int(rank) * 7919 + int(step)) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, reduce: bool,
             max_batches: Optional[int], name: str) -> Dict[str, float]:
    """{'test_error', 'test_loss'} of `model`; with reduce, sums over the workers' shards."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(1) == y).sum())
                count += y.numel()
    finally:
        model.train(was_training)
    if reduce:
        loss_sum, correct, count = allreduce_sum([loss_sum, correct, count], name=f"hvd_easgd.eval.{name}")
    if count == 0:
        return {"test_error": float("nan"), "test_loss": float("nan")}
    return {"test_error": 1.0 - correct / count, "test_loss": loss_sum / count}


def _stats(opt, kind: str, base: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """The optimizer's cumulative communication counters, plus those of the run before a resume."""
    if kind != "elastic":
        return {}
    s = opt.stats
    d = s.as_dict() if hasattr(s, "as_dict") else dict(vars(s))
    base = base or {}
    return {k: float(v) + float(base.get(k, 0.0)) for k, v in d.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _coerce_config(cfg: Union[DictConfig, dict, str, os.PathLike]) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, dict):
        return config_from_dict(cfg)
    return load_config(cfg)


def _broadcast_object(obj, rank: int, name: str):
    import horovod.torch as hvd

    if hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj if rank == 0 else None, root_rank=0, name=name)


#: Set to 1 to always send the checkpoint from rank 0 instead of letting every worker read it.
RESUME_BROADCAST_ENV = "HVD_EASGD_RESUME_BROADCAST"


def _fingerprint(payload: dict) -> list:
    """What identifies one checkpoint of one run (`origin` is the run's first start time)."""
    return [int(payload["step"]), float(payload.get("origin") or 0.0), float(payload["wall_time"])]


def _fresh_default_run_dir(base: Path, resume: bool, rank: int) -> Path:
    """The default run directory: ``runs/<name>``, or, when that already holds a run and this is
    not a resume, the first free ``runs/<name>-2``, ``-3``, ... so re-running a command never
    touches an earlier run. Rank 0 decides (workers may not share a file system)."""
    choice = base
    if rank == 0 and not resume:
        n = 1
        while ckpt.list_checkpoints(choice) or (choice / "metrics.jsonl").exists():
            n += 1
            choice = base.with_name(f"{base.name}-{n}")
    choice = Path(_broadcast_object(str(choice), rank, "hvd_easgd.run_dir"))
    if choice != base:
        _log(f"{base} already holds a run; writing this one to {choice} (--resume continues "
             f"{base}; --run-dir chooses)", rank)
    return choice


def _find_resume(run_dir: Path, resume: bool, rank: int) -> Optional[dict]:
    """Rank 0 picks the checkpoint and tells everyone (or raises the same error everywhere)."""
    decision: Dict[str, Any] = {}
    payload = None
    if rank == 0:
        existing = ckpt.list_checkpoints(run_dir)
        if not resume:
            if existing:
                decision["error"] = (
                    f"{run_dir} already holds checkpoints (newest: step {existing[-1][0]}); pass "
                    f"--resume to continue that run, or choose another run directory "
                    f"(--run-dir DIR or --set run_dir=DIR)"
                )
        else:
            found = ckpt.load_latest(run_dir)
            if found is None:
                decision["none"] = True
            else:
                path, payload = found
                decision.update(path=str(path.resolve()), fingerprint=_fingerprint(payload))
    decision = _broadcast_object(decision, rank, "hvd_easgd.resume.header")
    if "error" in decision:
        raise ConfigError(decision["error"])
    if decision.get("none"):
        _warn(f"--resume: no readable checkpoint in {run_dir}; starting from scratch", rank)
        return None
    if not decision:
        return None
    return _load_everywhere(Path(decision["path"]), decision["fingerprint"], payload, rank)


def _load_everywhere(path: Path, fingerprint: list, payload: Optional[dict], rank: int) -> dict:
    """Every worker gets rank 0's checkpoint: read from the file where a worker sees the same file
    (a shared file system), else sent by rank 0 (local disks, or a stale copy on another node)."""
    if rank != 0 and os.environ.get(RESUME_BROADCAST_ENV, "0") in ("", "0"):
        try:
            payload = ckpt.load_checkpoint(path)
            if _fingerprint(payload) != fingerprint:  # same name, another run or another save
                payload = None
        except Exception:  # noqa: BLE001 - not there or unreadable: rank 0 sends it
            payload = None
    missing = allreduce_sum([0.0 if payload is not None else 1.0], name="hvd_easgd.resume.missing")[0]
    if missing > 0:
        got = ckpt.broadcast_bytes(ckpt.serialize(payload) if rank == 0 else None, "hvd_easgd.resume.payload")
        if payload is None:
            payload = ckpt.deserialize(got)
    return payload


def run(
    cfg: Union[DictConfig, dict, str, os.PathLike],
    *,
    resume: bool = False,
    run_dir: Optional[Union[str, os.PathLike]] = None,
    stop_at_step: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Train as `cfg` says; return a summary dict (same on every rank, except rank-0-only paths).

    `resume`: continue from the newest readable checkpoint in the run directory (a warning and a
    fresh start if there is none). Without it, a run directory that already holds checkpoints is an
    error. `stop_at_step` stops after that step without the final evaluation/checkpoint (raises
    `TrainingStopped`): a simulated preemption for tests.
    """
    import horovod.torch as hvd

    from hvd_easgd.data import build_datasets, eval_loader, train_loader
    from hvd_easgd.models import build_model

    cfg = _coerce_config(cfg)
    if not hvd.is_initialized():
        hvd.init()
    rank, size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
    o, t = cfg.optimizer, cfg.train
    method = o.method
    solo = method in SINGLE_WORKER_METHODS
    name = cfg.name or "run"
    if run_dir is None and not cfg.run_dir:
        run_dir = _fresh_default_run_dir(Path("runs") / name, resume, rank)
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    cfg.run_dir = str(run_dir)

    if cfg.launch.np is not None and cfg.launch.np != size:
        _warn(f"the recipe was written for launch.np={cfg.launch.np} workers but hvd.size()={size}: "
              f"alpha = beta/p and the results differ from the recipe's intent", rank)
    if solo and size > 1:
        _warn(f"optimizer.method={method} is a single-worker method: each of the {size} workers "
              f"trains alone on the whole training set and only rank 0 reports; run it with -np 1", rank)
    if t.threads > 0:
        torch.set_num_threads(int(t.threads))
    device = _device(cfg, local_rank)

    # ---- resume decision (before anything is written) -------------------------------------
    state = _find_resume(run_dir, resume, rank)
    if state is not None:
        old = config_from_dict(state["config"], source=f"config in checkpoint {state['step']}")
        changed = [k for k in diff_configs(old, cfg) if k not in ("run_dir",)]
        if changed:
            _warn(f"resuming with a config that differs from the checkpoint's in: {', '.join(changed)}", rank)

    # ---- data -----------------------------------------------------------------------------
    d = cfg.data
    bundle = build_datasets(
        d.name, root=d.root, download=d.download, image_size=d.image_size,
        fake_train_size=d.fake_train_size, fake_test_size=d.fake_test_size,
        fake_image_shape=tuple(d.fake_image_shape), fake_num_classes=d.fake_num_classes,
    )
    data_rank, data_world = (0, 1) if solo else (rank, size)
    loader = train_loader(bundle.train, t.batch_size, rank=data_rank, world_size=data_world,
                          seed=t.seed, num_workers=d.num_workers)
    test_loader = eval_loader(bundle.test, t.eval_batch_size, rank=data_rank, world_size=data_world,
                              num_workers=d.num_workers)
    steps_per_epoch = len(loader)
    shard = loader.sampler.num_samples  # this worker's samples per epoch
    epoch_len = steps_per_epoch * t.batch_size  # of which it uses this many (whole batches)
    total_steps = int(t.max_steps) if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
    workers_in_step = 1 if solo else size  # samples of one step = batch * this

    # ---- model and optimizer -----------------------------------------------------------------
    torch.manual_seed(t.seed)
    in_channels, image_size = bundle.input_shape[0], bundle.input_shape[-1]
    model = build_model(cfg.model.name, bundle.num_classes, in_channels=in_channels,
                        image_size=image_size, dropout=cfg.model.dropout).to(device)
    same_world = state is not None and int(state["world_size"]) == size
    if state is not None and not same_world:
        _warn(f"resuming a run of {state['world_size']} workers with {size}: every worker restarts "
              f"from the center with a fresh local optimizer (local models, optimizer state and RNG "
              f"streams of the old workers are dropped)", rank)
        model.load_state_dict(state["center"])
    opt, kind = build_optimizer(cfg, model, size, rank)
    eval_model = copy.deepcopy(model) if kind == "elastic" else None

    step, epoch, epoch_samples, samples, wall0, origin = 0, 0, 0, 0, 0.0, None
    stats_base: Dict[str, float] = {}
    # training loss summed since the last log event (carried in checkpoints so logs resume exactly)
    loss_carry: tuple = (torch.zeros((), dtype=torch.float64), 0)
    if state is not None:
        step = int(state["step"])
        stats_base = {k: float(v) for k, v in state.get("comm_stats", {}).items()}
        epoch, samples, wall0 = int(state["epoch"]), int(state["samples"]), float(state["wall_time"])
        origin = state.get("origin")
        if same_world:
            mine = state["workers"][rank]
            model.load_state_dict(mine["model"])
            opt.load_state_dict(mine["optimizer"])
            ckpt.set_rng_state(mine["rng"])
            epoch_samples = int(state["epoch_samples"])
            loss_carry = (mine.get("loss_sum", loss_carry[0]), int(mine.get("loss_steps", 0)))
        else:
            # the same fraction of the epoch, in this world's shards, on a batch boundary
            consumed = int(state["epoch_samples"])  # per worker; a solo worker sees the whole set
            if not solo:
                consumed = consumed * int(state["world_size"]) // size
            epoch_samples = min(shard, consumed // t.batch_size * t.batch_size)
            _seed_worker_rng(t.seed, rank, step)
        _log(f"resumed from step {step} (epoch {epoch}, {epoch_samples} samples into it) in {run_dir}", rank)
    else:
        _seed_worker_rng(t.seed, rank, 0)
    if epoch_samples + t.batch_size > shard:  # the saved position is the end of an epoch
        epoch, epoch_samples = epoch + 1, 0
    resumed = state is not None
    state = None  # free the memory

    # ---- outputs (rank 0) -------------------------------------------------------------------------
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, active=rank == 0, tensorboard=cfg.log.tensorboard,
                           resume_step=step if resumed else None, origin=origin)
    progress = Progress(total_steps, initial=step, bar=rank == 0 and cfg.log.progress, echo=rank == 0, desc=name)
    clock = Stopwatch(wall0)
    summary: Dict[str, Any] = {}
    last: Dict[str, Any] = {"step": step, "wall": clock(), "stats": _stats(opt, kind, stats_base)}
    loss_acc, loss_n = loss_carry[0].to(device), loss_carry[1]  # summed on the device: no sync per step

    def position() -> Dict[str, Any]:
        return {"step": step, "epoch": epoch + epoch_samples / epoch_len, "wall_time": clock(),
                "samples": samples}

    def log_train() -> None:
        nonlocal loss_acc, loss_n
        clock.pause()  # the reduction below is logging, not training
        dist = float(opt.local_distance()) if kind == "elastic" else 0.0
        local = [float(loss_acc), float(loss_n), dist]
        if solo:
            total = local
        else:
            total = allreduce_sum(local, name="hvd_easgd.train.log")
        stats = _stats(opt, kind, stats_base)
        now = clock()
        interval = max(1e-12, now - last["wall"])
        metrics: Dict[str, Optional[float]] = {
            "train/loss": total[0] / max(1.0, total[1]),
            "lr": current_lr,
            "samples_per_sec": (step - last["step"]) * t.batch_size * workers_in_step / interval,
        }
        if kind == "elastic":
            rounds = stats.get("rounds", 0.0) - last["stats"].get("rounds", 0.0)
            secs = stats.get("comm_seconds", 0.0) - last["stats"].get("comm_seconds", 0.0)
            metrics["comm/seconds_per_round"] = secs / rounds if rounds > 0 else None
            metrics["comm/wait_seconds"] = stats.get("wait_seconds")
            metrics["comm/bytes"] = stats.get("bytes_communicated")
            metrics["distance_to_center"] = total[2] / (1 if solo else size)
        elif kind == "sync":
            # hvd.DistributedOptimizer allreduces every gradient at every step; it exposes no timers.
            metrics["comm/bytes"] = float(step * grad_bytes)
        pos = position()
        logger.log(pos["step"], pos["epoch"], pos["wall_time"], pos["samples"], metrics)
        summary.update({k: v for k, v in metrics.items() if v is not None})
        last.update(step=step, wall=now, stats=stats)
        loss_acc, loss_n = torch.zeros((), dtype=torch.float64, device=device), 0
        progress.set_postfix(loss=metrics["train/loss"], lr=current_lr, samples_per_sec=metrics["samples_per_sec"])
        clock.start()

    def run_eval() -> None:
        clock.pause()
        metrics: Dict[str, float] = {}
        if kind == "elastic":
            center_state(averaged=True)  # loads the evaluated center into eval_model
            c = evaluate(eval_model, test_loader, device, reduce=True, max_batches=t.max_eval_batches, name="center")
            metrics.update({"center/test_error": c["test_error"], "center/test_loss": c["test_loss"]})
            if t.eval_local:
                lo = evaluate(model, test_loader, device, reduce=True, max_batches=t.max_eval_batches, name="local")
                metrics.update({"local/test_error": lo["test_error"], "local/test_loss": lo["test_loss"]})
        else:
            c = evaluate(model, test_loader, device, reduce=not solo, max_batches=t.max_eval_batches, name="center")
            metrics.update({"center/test_error": c["test_error"], "center/test_loss": c["test_loss"]})
        pos = position()
        logger.log(pos["step"], pos["epoch"], pos["wall_time"], pos["samples"], metrics)
        summary.update(metrics)
        progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        clock.start()

    def center_state(averaged: bool) -> Dict[str, torch.Tensor]:
        """The complete state_dict of the center, loaded into `eval_model` (never into the trained
        model). averaged=True gives the evaluated/shipped model: the running or moving average of
        the center for adownpour/mvadownpour. Buffers that are not averaged across workers
        (BatchNorm statistics with optimizer.average_buffers false) come from this worker's model.
        Non-elastic methods have no center: their model is returned."""
        if kind != "elastic":
            return model.state_dict()
        opt.synchronize()
        use_avg = averaged and ELASTIC[method][2] is not None
        center = opt.averaged_center_state_dict() if use_avg else opt.center_state_dict()
        eval_model.load_state_dict(model.state_dict())
        eval_model.load_state_dict(center, strict=False)
        return eval_model.state_dict()

    def save() -> None:
        clock.pause()
        if kind == "elastic":
            opt.synchronize()
        mine = ckpt.to_cpu({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.get_rng_state(),
                            "loss_sum": loss_acc, "loss_steps": loss_n})
        raw_center = ckpt.to_cpu(center_state(averaged=False))
        shipped = ckpt.to_cpu(center_state(averaged=True)) if kind == "elastic" and ELASTIC[method][2] else raw_center
        workers = [mine] if size == 1 else ckpt.gather_bytes(ckpt.serialize(mine), name="hvd_easgd.ckpt")
        if rank == 0:
            if size > 1:
                workers = [ckpt.deserialize(w) for w in workers]
            payload = {
                "epoch": epoch, "epoch_samples": epoch_samples, "samples": samples, "wall_time": clock(),
                "origin": logger.origin, "world_size": size, "method": method, "config": to_dict(cfg),
                "center": raw_center, "center_model": shipped, "workers": workers,
            }
            if kind == "elastic":
                payload["rounds"] = int(opt.round_count)
                payload["comm_stats"] = _stats(opt, kind, stats_base)
            path = ckpt.save_checkpoint(run_dir, step, payload, keep=cfg.checkpoint.keep)
            progress.write(f"step {step}: checkpoint {path}")
        clock.start()

    grad_bytes = sum(p.numel() * (2 if o.compression == "fp16" else p.element_size())
                     for p in model.parameters() if p.requires_grad)
    current_lr = lr_at(cfg, max(1, step + 1), steps_per_epoch, total_steps)
    if rank == 0:
        _log(f"{name}: method={method} mode={o.mode} tau={o.tau} workers={size} "
             f"steps={total_steps} ({steps_per_epoch}/epoch) batch={t.batch_size}/worker device={device} "
             f"run_dir={run_dir}", rank)

    criterion = nn.CrossEntropyLoss()
    model.train()
    stopped = False
    try:
        clock.start()
        while step < total_steps and not stopped:
            loader.sampler.set_epoch(epoch, start_index=epoch_samples)
            # The DataLoader draws its base seed from this generator, not from the global RNG,
            # so creating an iterator mid-epoch (on resume) leaves the training RNG stream alone.
            loader.generator = torch.Generator().manual_seed(t.seed * 100_003 + epoch * 101 + rank)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                current_lr = lr_at(cfg, step + 1, steps_per_epoch, total_steps)
                _set_lr(opt, current_lr)
                loss = criterion(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                epoch_samples += int(y.shape[0])
                samples += int(y.shape[0]) * workers_in_step
                loss_acc += loss.detach().to(torch.float64)
                loss_n += 1
                progress.update(1)
                if on_step is not None:
                    on_step(step)
                final = step >= total_steps
                if step % cfg.log.every == 0 or final:
                    log_train()
                if t.eval_every and step % t.eval_every == 0 and not final:
                    run_eval()
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not final:
                    save()
                if stop_at_step is not None and step >= stop_at_step and not final:
                    stopped = True
                    break
                if final:
                    break
            else:
                epoch, epoch_samples = epoch + 1, 0
                continue
        clock.pause()
        if stopped:
            raise TrainingStopped(f"stopped after step {step} (stop_at_step)")
        run_eval()
        clock.pause()
        if cfg.checkpoint.at_end:
            save()
            clock.pause()
        center_path = None
        if cfg.checkpoint.export_center:
            state_dict = ckpt.to_cpu(center_state(averaged=True))
            if rank == 0:
                center_path = ckpt.export_state_dict(state_dict, run_dir / ckpt.CENTER_FILE)
        hparams = {
            "method": method, "mode": o.mode, "tau": int(o.tau), "workers": size, "lr": float(o.lr),
            "beta": float(o.beta) if o.beta is not None else -1.0,
            "alpha": float(o.alpha) if o.alpha is not None else -1.0, "momentum": float(o.momentum),
            "batch_size": int(t.batch_size), "weight_decay": float(o.weight_decay),
            "model": cfg.model.name, "data": d.name, "schedule": o.schedule.name,
        }
        logger.hparams(hparams, {k: summary.get(k) for k in ("center/test_error", "center/test_loss", "train/loss")})
        summary.update(
            run_dir=str(run_dir), step=step, epoch=epoch + epoch_samples / epoch_len, samples=samples,
            wall_time=clock(), world_size=size, method=method, mode=o.mode,
            center_path=str(center_path) if center_path is not None else None,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        )
        return summary
    finally:
        progress.close()
        logger.close()
        if kind == "elastic" and hasattr(opt, "close"):
            opt.close()


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd-easgd-train",
        description="Train with EASGD/EAMSGD or a baseline from a YAML recipe; run under horovodrun, "
                    "e.g. horovodrun -np 2 -H localhost:2 --gloo hvd-easgd-train --config recipes/demo/digits.yaml",
    )
    p.add_argument("--config", "-c", help="the YAML recipe (with --resume, defaults to RUN_DIR/config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optimizer.lr=0.01 (repeatable)")
    p.add_argument("--run-dir", help="where logs, checkpoints and center.pt go (default: run_dir, or runs/<name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run directory")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config_path = args.config
    if config_path is None:
        if not (args.resume and args.run_dir):
            print("hvd-easgd-train: error: --config is required (or --resume --run-dir DIR)", file=sys.stderr)
            return 2
        config_path = str(Path(args.run_dir) / "config.yaml")
    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as e:
        print(f"hvd-easgd-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from hvd_easgd.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    import horovod.torch as hvd

    try:
        summary = run(cfg, resume=args.resume, run_dir=args.run_dir)
    except ConfigError as e:  # raised on every rank alike: say it once
        if not hvd.is_initialized() or hvd.rank() == 0:
            print(f"hvd-easgd-train: config error: {e}", file=sys.stderr)
        return 2

    if hvd.rank() == 0:
        keys = ("center/test_error", "center/test_loss", "train/loss", "step", "wall_time", "run_dir")
        print("final: " + ", ".join(f"{k}={summary[k]}" for k in keys if summary.get(k) is not None), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
