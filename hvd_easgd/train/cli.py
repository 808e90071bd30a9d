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

Checkpoints (rank 0 writes them; see hvd_easgd/train/checkpoint.py for the atomic write): the center,
every worker's parameters, optimizer state (with the EASGD center and step/round counters), RNG
states (torch, numpy, python) and loss accumulator, gathered from all workers; the data position
(epoch, samples consumed this epoch), the step, the samples, `wall_time`, the communication
counters and the resolved config. `--resume` (run(..., resume=True)) continues from the newest
checkpoint that loads; every worker reads it itself when it sees the same file (shared file system)
and otherwise gets rank 0's copy (set HVD_EASGD_RESUME_BROADCAST=1 to always do that). With another
number of workers than the checkpoint's, every worker restarts from the center with a fresh local
optimizer and RNG streams, at the same fraction of the epoch (a warning says so). Under an elastic
launch (`elastic.enabled`) the same decisions (`open_run`) are made in the job's first elastic
sync instead, so that nothing collective runs before `hvd.elastic.run` (hvd_easgd/train/trainer.py).

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
training set and rank 0 reports). diloco (Douillard et al. 2023) restarts every worker from
the center after each round; the center takes a Nesterov SGD step (`optimizer.outer_lr`,
`optimizer.outer_momentum`) on the outer gradient `c - mean_i x_i`; with it use
`optimizer.local_optimizer: adamw` (DiLoCo's inner AdamW; `optimizer.lr` is then AdamW's).
`optimizer.hierarchy: host` (any elastic method) makes the workers of each host one
synchronous-SGD group and runs the method between the groups (`hvd_easgd.optim.hierarchy`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from hvd_easgd.train import checkpoint as ckpt
from hvd_easgd.train.config import (
    SINGLE_WORKER_METHODS, ConfigError, DictConfig, config_from_dict, diff_configs, load_config,
)
from hvd_easgd.train.metrics import allreduce_sum
from hvd_easgd.train.trainer import TrainingStopped  # noqa: F401 - part of this module's API

#: optimizer.method -> (wrapper method, local optimizer has Nesterov momentum, center average)
ELASTIC = {
    "easgd": ("easgd", False, None),
    "eamsgd": ("easgd", True, None),
    "downpour": ("downpour", False, None),
    "mdownpour": ("mdownpour", False, None),
    "average": ("average", False, None),
    "adownpour": ("downpour", False, "running"),
    "mvadownpour": ("downpour", False, "moving"),
    "diloco": ("diloco", False, None),
}


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
        if o.local_optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=float(o.lr),
                                     weight_decay=float(o.weight_decay))
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
        # Under an elastic launch the first elastic sync broadcasts them (a collective here
        # would deadlock a worker that joins against the others' sync).
        from hvd_easgd.optim.recovery import elastic_launch

        if not elastic_launch():
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return opt, "sync"

    import hvd_easgd

    wrapper_method, nesterov, center_average = ELASTIC[method]
    kwargs: Dict[str, Any] = dict(
        named_parameters=model.named_parameters(), tau=int(o.tau), method=wrapper_method,
        mode=o.mode, compression=compression, nonfinite_patience=int(o.nonfinite_patience),
        start_early=bool(o.start_early), sync_sgd_steps=int(o.sync_sgd_steps),
        survivors=str(o.survivors),
    )
    if wrapper_method == "diloco":
        from hvd_easgd.optim.outer import nesterov as outer_nesterov

        kwargs["outer_optimizer"] = outer_nesterov(float(o.outer_lr), float(o.outer_momentum))
    elif o.alpha is not None:
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
    if o.hierarchy is not None:
        from hvd_easgd.train.config import parse_hierarchy

        kwargs["hierarchy"] = parse_hierarchy(o.hierarchy)
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


def open_run(cfg: DictConfig, run_dir: Optional[Union[str, os.PathLike]], resume: bool,
             rank: int) -> tuple:
    """(run directory, checkpoint payload or None): the same on every worker.

    A collective: rank 0 decides and tells the others. Outside an elastic launch `run` calls
    it before building the Trainer; under one, the job's first elastic sync calls it (a worker
    that joins later takes both from the workers already training), so that no collective
    runs outside Horovod's sync. Sets ``cfg.run_dir``."""
    if run_dir is None and not cfg.run_dir:
        run_dir = _fresh_default_run_dir(Path("runs") / (cfg.name or "run"), resume, rank)
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    cfg.run_dir = str(run_dir)
    state = _find_resume(run_dir, resume, rank)
    if state is not None:
        old = config_from_dict(state["config"], source=f"config in checkpoint {state['step']}")
        changed = [k for k in diff_configs(old, cfg) if k not in ("run_dir",)]
        if changed:
            _warn(f"resuming with a config that differs from the checkpoint's in: {', '.join(changed)}", rank)
    return run_dir, state


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


def build_bundle(cfg: DictConfig):
    """The datasets of `cfg.data` (checked: a missing path is a clear error)."""
    from hvd_easgd.train.data import build_datasets

    d = cfg.data
    return build_datasets(
        d.name, root=d.root, download=d.download, image_size=d.image_size, augment=d.augment,
        fake_train_size=d.fake_train_size, fake_test_size=d.fake_test_size,
        fake_image_shape=tuple(d.fake_image_shape), fake_num_classes=d.fake_num_classes,
    )


def build_model_and_optimizer(cfg: DictConfig, bundle, device: torch.device, size: int, rank: int,
                              resume_state: Optional[dict]):
    """(model, optimizer, kind): the same initial weights everywhere (seeded; the elastic
    optimizer also broadcasts rank 0's). Resuming with another number of workers starts every
    worker from the checkpoint's center."""
    from hvd_easgd.train.models import build_model

    torch.manual_seed(cfg.train.seed if cfg.train.init_seed is None else cfg.train.init_seed)
    in_channels, image_size = bundle.input_shape[0], bundle.input_shape[-1]
    model = build_model(cfg.model.name, bundle.num_classes, in_channels=in_channels,
                        image_size=image_size, dropout=cfg.model.dropout).to(device)
    if resume_state is not None and int(resume_state["world_size"]) != size:
        _warn(f"resuming a run of {resume_state['world_size']} workers with {size}: every worker "
              f"restarts from the center with a fresh local optimizer (local models, optimizer "
              f"state and RNG streams of the old workers are dropped)", rank)
        model.load_state_dict(resume_state["center"])
    opt, kind = build_optimizer(cfg, model, size, rank)
    return model, opt, kind


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
    `TrainingStopped`): a simulated preemption for tests. `on_step(step)` is called after every
    step (tests use it to inject faults).
    """
    import horovod.torch as hvd

    from hvd_easgd.train.trainer import Trainer

    from hvd_easgd.optim.tuning import apply_horovod_settings, late_recipe_warning, recipe_settings

    cfg = _coerce_config(cfg)
    recipe = recipe_settings(cfg.horovod.cycle_time_ms)
    notes: List[str] = []  # said by rank 0 once Horovod knows the ranks
    if not hvd.is_initialized():  # Horovod reads them in init(): the recipe's, else ours or yours
        apply_horovod_settings(recipe=recipe, warn=notes.append)
        if cfg.optimizer.hierarchy is not None:  # the optimizer registers its process sets
            os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
        hvd.init()
    elif recipe:
        notes.append(late_recipe_warning(recipe) or "")
    rank, size = hvd.rank(), hvd.size()
    for note in filter(None, notes):
        _warn(note, rank)
    _check_world(cfg, size, rank)
    from hvd_easgd.optim.recovery import elastic_launch

    if cfg.elastic.enabled and elastic_launch():  # decided in the first elastic sync
        return Trainer(cfg, None, None, stop_at_step=stop_at_step, on_step=on_step,
                       elastic_start=(run_dir, resume)).run()
    run_dir, state = open_run(cfg, run_dir, resume, rank)
    trainer = Trainer(cfg, run_dir, state, stop_at_step=stop_at_step, on_step=on_step)
    state = None  # free the memory
    trainer.announce()
    return trainer.run()


def _check_world(cfg: DictConfig, size: int, rank: int) -> None:
    method = cfg.optimizer.method
    if cfg.launch.np is not None and cfg.launch.np != size and not cfg.elastic.enabled:
        _warn(f"the recipe was written for launch.np={cfg.launch.np} workers but hvd.size()={size}: "
              f"alpha = beta/p and the results differ from the recipe's intent", rank)
    if method in SINGLE_WORKER_METHODS and size > 1:
        _warn(f"optimizer.method={method} is a single-worker method: each of the {size} workers "
              f"trains alone on the whole training set and only rank 0 reports; run it with -np 1", rank)


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
    p.add_argument("--quiet", action="store_true",
                   help="no progress or evaluation lines, only warnings, errors and the summary "
                        "(log.quiet)")
    p.add_argument("--log-every", type=float, metavar="SECONDS",
                   help="seconds between progress lines under horovodrun (log.console_seconds, "
                        "default 15)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config_path = args.config
    if config_path is None:
        if not (args.resume and args.run_dir):
            print("hvd-easgd-train: error: --config is required (or --resume --run-dir DIR)", file=sys.stderr)
            return 2
        config_path = str(Path(args.run_dir) / "config.yaml")
    overrides = list(args.overrides)
    if args.quiet:
        overrides.append("log.quiet=true")
    if args.log_every is not None:
        overrides.append(f"log.console_seconds={args.log_every}")
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"hvd-easgd-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from hvd_easgd.train.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    import horovod.torch as hvd

    from hvd_easgd.optim.recovery import NonFiniteError

    try:
        summary = run(cfg, resume=args.resume, run_dir=args.run_dir)
    except ConfigError as e:  # raised on every rank alike: say it once
        if not hvd.is_initialized() or hvd.rank() == 0:
            print(f"hvd-easgd-train: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # raised on every rank alike
        # Every rank says it: horovodrun may stop rank 0 as soon as another rank has exited.
        print(f"hvd-easgd-train: training stopped: {e}", file=sys.stderr, flush=True)
        return 3

    del summary  # rank 0's console has printed it
    return 0


if __name__ == "__main__":
    sys.exit(main())
