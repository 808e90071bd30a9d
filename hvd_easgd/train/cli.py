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
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from hvd_easgd.train.config import (
    SINGLE_WORKER_METHODS, ConfigError, DictConfig, config_from_dict, load_config,
)
from hvd_easgd.train.console import warn_on_rank0
from hvd_easgd.train.factory import create_parts
from hvd_easgd.train.resume import open_run
from hvd_easgd.train.trainer import Trainer, TrainingStopped

__all__ = ["main", "run", "build_parser", "TrainingStopped"]


def _coerce_config(cfg: Union[DictConfig, dict, str, os.PathLike]) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, dict):
        return config_from_dict(cfg)
    return load_config(cfg)


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

    from hvd_easgd.optim import elastic_launch

    cfg = _coerce_config(cfg)
    start_horovod(cfg)
    rank, size = hvd.rank(), hvd.size()
    _check_world(cfg, size, rank)
    build = dict(rank=rank, size=size, local_rank=hvd.local_rank())
    if cfg.elastic.enabled and elastic_launch():  # decided in the first elastic sync
        return Trainer(cfg, create_parts(cfg, **build), None, None, stop_at_step=stop_at_step,
                       on_step=on_step, elastic_start=(run_dir, resume)).run()
    cfg, run_dir, state = open_run(cfg, run_dir, resume, rank)
    trainer = Trainer(cfg, create_parts(cfg, resume_state=state, **build), run_dir, state,
                      stop_at_step=stop_at_step, on_step=on_step)
    state = None  # free the memory
    trainer.announce()
    return trainer.run()


def start_horovod(cfg: DictConfig) -> None:
    """``hvd.init()`` with the recipe's Horovod settings (Horovod reads them in init: the
    recipe's, else hvd-easgd's or yours); when Horovod is already up, a warning that the
    recipe's settings come too late."""
    import horovod.torch as hvd

    from hvd_easgd.optim import apply_horovod_settings, late_recipe_warning, recipe_settings

    recipe = recipe_settings(cfg.horovod.cycle_time_ms)
    notes: List[str] = []  # said by rank 0 once Horovod knows the ranks
    if not hvd.is_initialized():
        apply_horovod_settings(recipe=recipe, warn=notes.append)
        if cfg.optimizer.hierarchy is not None:  # the optimizer registers its process sets
            os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
        hvd.init()
    elif recipe:
        notes.append(late_recipe_warning(recipe) or "")
    for note in filter(None, notes):
        warn_on_rank0(note, hvd.rank())


def _check_world(cfg: DictConfig, size: int, rank: int) -> None:
    method = cfg.optimizer.method
    if cfg.launch.np is not None and cfg.launch.np != size and not cfg.elastic.enabled:
        warn_on_rank0(f"the recipe was written for launch.np={cfg.launch.np} workers but "
                      f"hvd.size()={size}: alpha = beta/p and the results differ from the "
                      f"recipe's intent", rank)
    if method in SINGLE_WORKER_METHODS and size > 1:
        warn_on_rank0(f"optimizer.method={method} is a single-worker method: each of the {size} "
                      f"workers trains alone on the whole training set and only rank 0 reports; "
                      f"run it with -np 1", rank)


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

    from hvd_easgd.optim import NonFiniteError

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
