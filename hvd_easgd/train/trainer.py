"""The training loop behind `hvd-easgd-train`: a :class:`Trainer` over explicit loop state.

:class:`LoopState` is where training is (step, epoch, position in the epoch, samples, training
time): what a checkpoint, a resume and a Horovod Elastic commit carry. :class:`LossMeter` holds
the training loss summed on the device between log events (no host sync per step) and the
streaks of non-finite losses. :class:`Trainer` owns one run, trains the :class:`Parts` it is
given (built by :mod:`hvd_easgd.train.factory`) and is split the way it runs:

- setup (``__init__``): this worker's shards, the resumed state, the outputs (rank 0:
  metrics.jsonl, TensorBoard, checkpoints);
- :meth:`Trainer.train_loop` / :meth:`Trainer.train_one_epoch`: the steps, and the events
  between them (:meth:`log_train`, :meth:`validate`, :meth:`save`, elastic commits);
- :meth:`Trainer.finish`: the final evaluation, checkpoint, `center.pt` and the summary.

With ``elastic.enabled`` (and an elastic ``horovodrun``, see ``launch/run_elastic.sh``) the loop
and the finish run inside ``hvd.elastic.run`` with :class:`TrainerState`, which adds the loop
state to Horovod's model and optimizer state: a lost worker rolls every survivor back to the
last commit; after every reset the loop state comes from the lowest-ranked survivor, the data
are re-sharded over the new workers from the same position in the epoch, and rank 0's outputs
(metrics, TensorBoard, checkpoints) continue from that step, whichever process is rank 0 now.
Nothing collective runs before ``hvd.elastic.run`` (a worker that joins would wait there while
the others wait in their sync): the job's first sync picks the run directory and the checkpoint
to resume from (:meth:`Trainer.start_job`), and a worker that joins later takes them, with the loop
state, from the workers already training. The console says which hosts left or joined.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from hvd_easgd.optim import effective_settings
from hvd_easgd.train import checkpoint as ckpt
from hvd_easgd.train.config import (
    ELASTIC_METHODS, SINGLE_WORKER_METHODS, ConfigError, DictConfig, save_config, to_dict,
    with_run_dir,
)
from hvd_easgd.train.console import Console, summary_lines, warn_on_rank0
from hvd_easgd.train.data import DataBundle
from hvd_easgd.train.evaluation import evaluate
from hvd_easgd.train.metrics import MetricsLogger, Stopwatch, allreduce_sum
from hvd_easgd.train.resume import open_run


class TrainingStopped(Exception):
    """Raised by `run(..., stop_at_step=N)` after step N (a simulated preemption, for tests)."""


@dataclass
class LoopState:
    """Where training is. ``epoch_samples`` counts this worker's shard of a world of
    ``world_size`` workers; ``wall_time`` is seconds of training (evaluation and checkpoints
    excluded)."""

    step: int = 0
    epoch: int = 0
    epoch_samples: int = 0
    samples: int = 0
    wall_time: float = 0.0
    world_size: int = 1

    @classmethod
    def from_checkpoint(cls, state: dict) -> "LoopState":
        """Where the checkpoint's run was, in the checkpoint's world."""
        return cls(step=int(state["step"]), epoch=int(state["epoch"]),
                   epoch_samples=int(state["epoch_samples"]), samples=int(state["samples"]),
                   wall_time=float(state["wall_time"]), world_size=int(state["world_size"]))

    def advance(self, batch: int, workers: int) -> None:
        """One step of `batch` samples on each of `workers` workers."""
        self.step += 1
        self.epoch_samples += batch
        self.samples += batch * workers

    def next_epoch(self) -> None:
        self.epoch, self.epoch_samples = self.epoch + 1, 0

    def move_to(self, epoch_samples: int, world_size: int) -> None:
        """The same point of the epoch, counted in a shard of a world of `world_size`."""
        self.epoch_samples, self.world_size = int(epoch_samples), int(world_size)


@dataclass
class Parts:
    """What a :class:`Trainer` trains with, built from the config by
    :func:`hvd_easgd.train.factory.create_parts`.

    ``loaders(rank, size)`` gives (training loader, test loader) of a worker's shards, again
    after an elastic reset; ``lr_at(step, steps_per_epoch, total_steps)`` is the schedule;
    ``kind`` is 'elastic' (an ``hvd_easgd.optim.ElasticOptimizer``), 'sync' (Horovod's) or
    'solo' (no communication)."""

    device: torch.device
    data: DataBundle
    model: nn.Module
    optimizer: Any
    kind: str
    loaders: Callable[[int, int], Tuple[Any, Any]]
    lr_at: Callable[[int, int, int], float]


@dataclass
class LossMeter:
    """The training loss since the last log event, kept on the device."""

    device: torch.device
    total: torch.Tensor = field(init=False)
    steps: int = 0
    nonfinite: torch.Tensor = field(init=False)
    streak: torch.Tensor = field(init=False)
    worst_streak: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.clear(carry=(torch.zeros((), dtype=torch.float64), 0))
        self.streak = torch.zeros((), dtype=torch.float64, device=self.device)

    def clear(self, carry: Optional[tuple] = None) -> None:
        total, steps = carry if carry is not None else (torch.zeros((), dtype=torch.float64), 0)
        self.total, self.steps = total.to(self.device), int(steps)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        self.worst_streak = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, loss: torch.Tensor) -> None:
        value = loss.detach().to(torch.float64)
        bad = torch.isfinite(value).logical_not().to(torch.float64)
        self.total += torch.where(bad > 0, torch.zeros_like(value), value)
        self.steps += 1
        self.nonfinite += bad
        self.streak = (self.streak + 1) * bad
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)


class Trainer:
    """One training run on this worker, with the `parts` built for it; see the module docstring.

    `run_dir` and `resume_state` are what :func:`hvd_easgd.train.resume.open_run` decided (`cfg`
    has that ``run_dir``). ``elastic_start=(run_dir or None, resume)``: an elastic job, whose run
    directory and checkpoint the first elastic sync decides (``run_dir`` and ``resume_state``
    are then None); until then the outputs are closed on every rank."""

    def __init__(self, cfg: DictConfig, parts: Parts, run_dir: Optional[Path],
                 resume_state: Optional[dict], *,
                 stop_at_step: Optional[int] = None,
                 on_step: Optional[Callable[[int], None]] = None,
                 elastic_start: Optional[tuple] = None) -> None:
        import time

        import horovod.torch as hvd

        self.elastic_start = elastic_start
        if run_dir is None:  # not decided yet: a placeholder no output is written to
            run_dir = Path(elastic_start[0] if elastic_start and elastic_start[0] else cfg.run_dir or "runs")
        self.cfg, self.run_dir, self.parts = cfg, Path(run_dir), parts
        self.method = cfg.optimizer.method
        self.solo = self.method in SINGLE_WORKER_METHODS
        self.stop_at_step, self.on_step = stop_at_step, on_step
        self.rank, self.size = hvd.rank(), hvd.size()
        self.device, self.data = parts.device, parts.data
        self.model, self.opt, self.kind = parts.model, parts.optimizer, parts.kind
        self.build_loaders()
        self.eval_model = copy.deepcopy(self.model) if self.kind == "elastic" else None
        self.loop = LoopState(world_size=self.size)
        self.meter = LossMeter(self.device)
        self.diverged = 0  # log events in a row with the training loss far above chance
        self.best: Optional[tuple] = None  # (lowest center test error, its step)
        self.last_train: Dict[str, Optional[float]] = {}
        self.resume_note: Optional[str] = None
        self.elastic_state: Any = None  # the TrainerState, under hvd.elastic
        self.stats_base: Dict[str, float] = {}
        self.origin: Optional[float] = None
        self.hosts: list = []  # the host of each rank, once an elastic sync has gathered them
        if resume_state is not None:
            self.restore_from_checkpoint(resume_state)
        else:
            ckpt.seed_worker_rng(cfg.train.seed, self.rank, 0)
        self.resumed = resume_state is not None
        self.plan_total_steps()
        self.clock = Stopwatch(self.loop.wall_time)
        self.summary: Dict[str, Any] = {}
        #: what the whole job shares, whichever process is rank 0: the console's start
        self.job: Optional[Dict[str, Any]] = None if elastic_start else {
            "started": time.time(), "start_step": self.loop.step}
        self.open_outputs(resume_step=self.loop.step if self.resumed else None,
                          active=self.rank == 0 and not elastic_start)
        if self.resume_note:
            self.console.say(self.resume_note, always=True)
        self.last = {"step": self.loop.step, "wall": self.clock(), "stats": self.comm_stats()}
        self.current_lr = self.lr_for(self.loop.step + 1)
        self.grad_bytes = sum(p.numel() * (2 if cfg.optimizer.compression == "fp16" else p.element_size())
                              for p in self.model.parameters() if p.requires_grad)
        self.criterion = nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ setup pieces

    def build_loaders(self) -> None:
        """This world's shard of the data (again after an elastic reset)."""
        t = self.cfg.train
        self.loader, self.test_loader = self.parts.loaders(self.rank, self.size)
        self.steps_per_epoch = len(self.loader)
        self.shard = self.loader.sampler.num_samples  # this worker's samples per epoch
        self.epoch_len = self.steps_per_epoch * t.batch_size  # of which it uses this many
        self.workers_in_step = 1 if self.solo else self.size

    def plan_total_steps(self) -> None:
        """The step to stop at: ``train.max_steps``, or the end of ``train.epochs`` counted
        from where the loop is, in this world's steps per epoch (which change with the number
        of workers: after an elastic reset or a resume with another world size)."""
        t, loop = self.cfg.train, self.loop
        if t.max_steps is not None:
            self.total_steps = int(t.max_steps)
            return
        planned = max(1, math.ceil(t.epochs * self.steps_per_epoch))
        here = loop.epoch * self.steps_per_epoch + loop.epoch_samples // t.batch_size
        self.total_steps = loop.step + max(0, planned - here)

    def restore_from_checkpoint(self, state: dict) -> None:
        """Continue where the checkpoint `state` left off: this worker's own model, optimizer,
        RNG and loss accumulator when the world has the checkpoint's size, else the same point
        of the epoch in this world's shards with fresh RNG streams."""
        self.loop = LoopState.from_checkpoint(state)
        loop = self.loop
        self.stats_base = {k: float(v) for k, v in state.get("comm_stats", {}).items()}
        self.origin = state.get("origin")
        if int(state["world_size"]) == self.size:
            mine = state["workers"][self.rank]
            self.model.load_state_dict(mine["model"])
            self.opt.load_state_dict(mine["optimizer"])
            ckpt.set_rng_state(mine["rng"])
            self.meter.clear(carry=(mine.get("loss_sum", torch.zeros((), dtype=torch.float64)),
                                    int(mine.get("loss_steps", 0))))
        else:
            old = 1 if self.solo else int(state["world_size"])
            self.set_position(int(state["epoch_samples"]), old)
            ckpt.seed_worker_rng(self.cfg.train.seed, self.rank, loop.step)
        self.resume_note = (f"resumed from step {loop.step} (epoch {loop.epoch}, "
                            f"{loop.epoch_samples} samples into it) in {self.run_dir}")

    def restart_from_center(self, state: dict) -> None:
        """Every worker starts from the checkpoint's center with a fresh local optimizer: a
        resume under Horovod Elastic with another number of workers than the checkpoint's.
        Needs the elastic optimizer synced (called from the first elastic sync)."""
        warn_on_rank0(f"resuming a run of {state['world_size']} workers with {self.size}: every "
                      f"worker restarts from the center with a fresh local optimizer", self.rank)
        self.model.load_state_dict(state["center"])
        if self.kind == "elastic":
            import warnings

            with warnings.catch_warnings():  # "saved with N workers": said just above
                warnings.simplefilter("ignore")
                self.opt.load_state_dict(state["workers"][0]["optimizer"])  # center, counters
            self.opt.optimizer.state.clear()

    def set_position(self, epoch_samples: int, old_world: int) -> None:
        """Continue the epoch where ``old_world`` workers left it, in this world's shards.

        Worker r's shard is the permutation's entries r, r+p, ...: k samples of every shard are
        the permutation's first k*p entries, so k*p_old/p_new of each new shard covers them."""
        consumed = epoch_samples if self.solo else epoch_samples * old_world // self.size
        batch = self.cfg.train.batch_size
        self.loop.move_to(min(self.shard, consumed // batch * batch), self.size)

    def open_outputs(self, resume_step: Optional[int], active: Optional[bool] = None) -> None:
        """Rank 0's metrics.jsonl, TensorBoard writer and console; a no-op elsewhere (and
        everywhere with ``active=False``)."""
        cfg = self.cfg
        active = self.rank == 0 if active is None else active
        if active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(self.run_dir, active=active, tensorboard=cfg.log.tensorboard,
                                    resume_step=resume_step, origin=self.origin)
        self.origin = self.logger.origin
        job = self.job or {}
        self.console = Console(self.run_dir, active=active, total_steps=self.total_steps,
                               initial_step=job.get("start_step", self.loop.step),
                               every=cfg.log.console_seconds, quiet=cfg.log.quiet,
                               bar=cfg.log.progress, name=cfg.name or "run",
                               started=job.get("started"),
                               label=f"rank {self.rank}" if self.elastic_start else "")

    def announce(self) -> None:
        """The run's first console line: what trains, on how many workers, where it writes."""
        cfg, o = self.cfg, self.cfg.optimizer
        self.console.say(
            f"{cfg.name or 'run'}: method {o.method} ({o.mode}, tau {o.tau}), {self.size} "
            f"worker(s), {self.total_steps} steps ({self.steps_per_epoch}/epoch), batch "
            f"{cfg.train.batch_size}/worker on {self.device}; run dir {self.run_dir}", always=True)

    def close_outputs(self) -> None:
        self.console.close()
        self.logger.close()

    # ------------------------------------------------------------------ the loop

    def lr_for(self, step: int) -> float:
        return self.parts.lr_at(step, self.steps_per_epoch, self.total_steps)

    def train_loop(self) -> None:
        """Train to ``total_steps`` (raises TrainingStopped at ``stop_at_step``)."""
        self.model.train()
        self.clock.start()
        while self.loop.step < self.total_steps:
            if self.loop.epoch_samples + self.cfg.train.batch_size > self.shard:
                self.loop.next_epoch()
            self.train_one_epoch()
        self.clock.pause()

    def train_one_epoch(self) -> None:
        loop, t = self.loop, self.cfg.train
        self.loader.start_epoch(loop.epoch, loop.epoch_samples,
                                seed=t.seed * 100_003 + loop.epoch * 101 + self.rank)
        for x, y in self.loader:
            self.train_step(x, y)
            if self.after_step() or loop.step >= self.total_steps:
                return
        loop.next_epoch()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.current_lr = self.lr_for(self.loop.step + 1)
        for group in self.opt.param_groups:
            group["lr"] = self.current_lr
        loss = self.criterion(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.loop.advance(int(y.shape[0]), self.workers_in_step)
        self.meter.add(loss)
        self.console.step(1)

    def after_step(self) -> bool:
        """The events after a step; True when the run must stop here (stop_at_step)."""
        step, cfg = self.loop.step, self.cfg
        if self.on_step is not None:
            self.on_step(step)
        final = step >= self.total_steps
        if not final and self.out_of_time(step):
            self.total_steps, final = step, True  # finish() evaluates, checkpoints, exports
        if step % cfg.log.every == 0 or final:
            self.log_train()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and not final:
            self.validate()
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not final:
            self.save()
        if self.elastic_state is not None and step % cfg.elastic.commit_every == 0 and not final:
            self.clock.pause()
            self.elastic_state.commit()
            self.clock.start()
        if self.stop_at_step is not None and step >= self.stop_at_step and not final:
            raise TrainingStopped(f"stopped after step {step} (stop_at_step)")
        return False

    def out_of_time(self, step: int) -> bool:
        """``train.max_time``: checked every ``log.every`` steps; rank 0's training clock
        decides and one small allreduce tells everyone, so all workers stop after this step."""
        limit = self.cfg.train.max_time
        if limit is None or step % self.cfg.log.every != 0:
            return False
        self.clock.pause()
        past = 1.0 if self.rank == 0 and self.clock() >= float(limit) else 0.0
        stop = allreduce_sum([past], name="hvd_easgd.train.max_time")[0] > 0
        self.clock.start()
        if stop:
            self.summary["stopped_by"] = "train.max_time"
            self.console.say(f"step {step}: train.max_time={limit:g} s of training reached; "
                             f"finishing (final evaluation and checkpoint)", always=True)
        return stop

    # ------------------------------------------------------------------ events

    def comm_stats(self) -> Dict[str, float]:
        """The optimizer's cumulative communication counters, plus those of the run before a
        resume (none for Horovod's optimizer and the single-worker methods)."""
        if self.kind != "elastic":
            return {}
        counters = self.opt.stats.as_dict()
        return {k: float(v) + self.stats_base.get(k, 0.0) for k, v in counters.items()
                if isinstance(v, (int, float))}

    def log_train(self) -> None:
        from hvd_easgd.optim import NonFiniteError  # Horovod loads on first use

        self.clock.pause()  # the reduction below is logging, not training
        dist = float(self.opt.local_distance()) if self.kind == "elastic" else 0.0
        streaks = [0.0] * self.workers_in_step
        streaks[0 if self.solo else self.rank] = float(self.meter.worst_streak)
        local = [float(self.meter.total), float(self.meter.steps), dist, float(self.meter.nonfinite), *streaks]
        total = local if self.solo else allreduce_sum(local, name="hvd_easgd.train.log")
        patience = int(self.cfg.optimizer.nonfinite_patience)
        bad = [r for r, s in enumerate(total[4:]) if s >= patience]
        if bad:
            raise NonFiniteError(
                f"the training loss was NaN/inf for {patience} or more steps in a row on rank(s) "
                f"{', '.join(map(str, bad))} (at step {self.loop.step}; "
                f"optimizer.nonfinite_patience={patience}). Training diverges: lower "
                f"optimizer.lr (or add optimizer.schedule.warmup_epochs) and check the data "
                f"for NaN/inf inputs or bad labels.")
        self.check_divergence(total[0] / max(1.0, total[1] - total[3]))
        if total[3] > 0 and self.rank == 0:
            warn_on_rank0(f"{int(total[3])} training step(s) had a NaN/inf loss since the last log "
                         f"event (step {self.loop.step}); they are left out of train/loss", self.rank)
        self.write_train_metrics(total)
        self.clock.start()

    def check_divergence(self, loss: float) -> None:
        """Stop (on every worker alike: ``loss`` is averaged over them) when the training loss
        has stayed far above chance level, ``train.divergence_factor * ln(classes)``."""
        from hvd_easgd.optim import NonFiniteError

        factor, patience = float(self.cfg.train.divergence_factor), int(self.cfg.optimizer.nonfinite_patience)
        limit = factor * math.log(max(2, self.data.num_classes))
        self.diverged = self.diverged + 1 if factor > 0 and loss > limit else 0
        if self.diverged >= patience:
            raise NonFiniteError(
                f"training diverged: train/loss has been above {limit:.4g} ({factor:g} x the "
                f"chance-level loss ln({self.data.num_classes})) at {self.diverged} log events in "
                f"a row, now {loss:.4g} at step {self.loop.step}. Lower optimizer.lr (or add "
                f"optimizer.schedule.warmup_epochs) and check the data (NaN/inf inputs or bad "
                f"labels); train.divergence_factor=0 turns this check off.")

    def write_train_metrics(self, total: list) -> None:
        stats = self.comm_stats()
        now = self.clock()
        interval = max(1e-12, now - self.last["wall"])
        steps = self.loop.step - self.last["step"]
        metrics: Dict[str, Optional[float]] = {
            "train/loss": total[0] / max(1.0, total[1] - total[3]),
            "lr": self.current_lr,
            "samples_per_sec": steps * self.cfg.train.batch_size * self.workers_in_step / interval,
            "workers": float(self.size),
        }
        if self.kind == "elastic":
            rounds = stats.get("rounds", 0.0) - self.last["stats"].get("rounds", 0.0)
            secs = stats.get("comm_seconds", 0.0) - self.last["stats"].get("comm_seconds", 0.0)
            metrics["comm/seconds_per_round"] = secs / rounds if rounds > 0 else None
            metrics["comm/wait_seconds"] = stats.get("wait_seconds")
            metrics["comm/bytes"] = stats.get("bytes_communicated")
            metrics["comm/skipped_rounds"] = stats.get("skipped_rounds")
            metrics["comm/cross_group_bytes"] = stats.get("cross_group_bytes")
            metrics["distance_to_center"] = total[2] / (1 if self.solo else self.size)
        elif self.kind == "sync":
            # hvd.DistributedOptimizer allreduces every gradient at every step; no timers.
            metrics["comm/bytes"] = float(self.loop.step * self.grad_bytes)
        self.log_metrics(metrics)
        self.last.update(step=self.loop.step, wall=now, stats=stats)
        self.meter.clear()
        self.last_train = metrics
        self.console.progress(self.loop.step, self.epoch_now(), metrics)

    def epoch_now(self) -> float:
        return self.loop.epoch + self.loop.epoch_samples / self.epoch_len

    def log_metrics(self, metrics: Dict[str, Optional[float]]) -> None:
        loop = self.loop
        self.logger.log(loop.step, self.epoch_now(), self.clock(), loop.samples, metrics)
        self.summary.update({k: v for k, v in metrics.items() if v is not None})

    def validate(self) -> None:
        """Test error of the center (and of the local models) over all workers' test shards."""
        self.clock.pause()
        t, metrics = self.cfg.train, {}
        kwargs = dict(max_batches=t.max_eval_batches, reduce=not self.solo)
        if self.kind == "elastic":
            self.center_state(averaged=True)  # loads the evaluated center into eval_model
            c = evaluate(self.eval_model, self.test_loader, self.device, name="center", **kwargs)
            if t.eval_local:
                lo = evaluate(self.model, self.test_loader, self.device, name="local", **kwargs)
                metrics.update({"local/test_error": lo["test_error"], "local/test_loss": lo["test_loss"]})
        else:
            c = evaluate(self.model, self.test_loader, self.device, name="center", **kwargs)
        metrics = {"center/test_error": c["test_error"], "center/test_loss": c["test_loss"], **metrics}
        self.log_metrics(metrics)
        if self.best is None or c["test_error"] < self.best[0]:
            self.best = (c["test_error"], self.loop.step)
        if self.last_train:
            self.console.progress(self.loop.step, self.epoch_now(), self.last_train, force=True)
        self.console.evaluation(self.loop.step, metrics)
        self.clock.start()

    def center_state(self, averaged: bool) -> Dict[str, torch.Tensor]:
        """The complete state_dict of the center, loaded into `eval_model` (never into the
        trained model). averaged=True gives the evaluated/shipped model: the running or moving
        average of the center for adownpour/mvadownpour. Buffers not averaged across workers
        come from this worker's model. Non-elastic methods have no center: their model."""
        if self.kind != "elastic":
            return self.model.state_dict()
        self.opt.synchronize()
        use_avg = averaged and ELASTIC_METHODS[self.method][2] is not None
        center = self.opt.averaged_center_state_dict() if use_avg else self.opt.center_state_dict()
        self.eval_model.load_state_dict(self.model.state_dict())
        self.eval_model.load_state_dict(center, strict=False)
        return self.eval_model.state_dict()

    def save(self) -> None:
        """A checkpoint of every worker, written atomically by rank 0."""
        self.clock.pause()
        if self.kind == "elastic":
            self.opt.synchronize()
        mine = ckpt.to_cpu({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                            "rng": ckpt.get_rng_state(), "loss_sum": self.meter.total,
                            "loss_steps": self.meter.steps})
        raw_center = ckpt.to_cpu(self.center_state(averaged=False))
        averaged = self.kind == "elastic" and ELASTIC_METHODS[self.method][2]
        shipped = ckpt.to_cpu(self.center_state(averaged=True)) if averaged else raw_center
        workers = [mine] if self.size == 1 else ckpt.gather_bytes(ckpt.serialize(mine), name="hvd_easgd.ckpt")
        if self.rank == 0:
            self.write_checkpoint(raw_center, shipped, workers)
        self.clock.start()

    def write_checkpoint(self, raw_center: dict, shipped: dict, workers: list) -> None:
        loop = self.loop
        if self.size > 1:
            workers = [ckpt.deserialize(w) for w in workers]
        payload = {
            "epoch": loop.epoch, "epoch_samples": loop.epoch_samples, "samples": loop.samples,
            "wall_time": self.clock(), "origin": self.logger.origin, "world_size": self.size,
            "method": self.method, "config": to_dict(self.cfg), "center": raw_center,
            "center_model": shipped, "workers": workers,
        }
        if self.kind == "elastic":
            payload["rounds"] = int(self.opt.round_count)
            payload["comm_stats"] = self.comm_stats()
        path = ckpt.save_checkpoint(self.run_dir, loop.step, payload, keep=self.cfg.checkpoint.keep)
        self.console.say(f"step {loop.step}: checkpoint {path}")

    # ------------------------------------------------------------------ the end

    def finish(self) -> Dict[str, Any]:
        """Final evaluation, checkpoint and center export; the run's summary."""
        cfg, o, loop = self.cfg, self.cfg.optimizer, self.loop
        self.validate()
        self.clock.pause()
        if cfg.checkpoint.at_end:
            self.save()
            self.clock.pause()
        center_path = None
        if cfg.checkpoint.export_center:
            state_dict = ckpt.to_cpu(self.center_state(averaged=True))
            if self.rank == 0:
                center_path = ckpt.export_state_dict(state_dict, self.run_dir / ckpt.CENTER_FILE)
        hparams = {
            "method": self.method, "mode": o.mode, "tau": int(o.tau), "workers": self.size,
            "lr": float(o.lr), "beta": float(o.beta) if o.beta is not None else -1.0,
            "alpha": float(o.alpha) if o.alpha is not None else -1.0, "momentum": float(o.momentum),
            "batch_size": int(cfg.train.batch_size), "weight_decay": float(o.weight_decay),
            "model": cfg.model.name, "data": cfg.data.name, "schedule": o.schedule.name,
        }
        self.logger.hparams(hparams, {k: self.summary.get(k) for k in
                                      ("center/test_error", "center/test_loss", "train/loss")})
        self.summary.update(
            run_dir=str(self.run_dir), step=loop.step, epoch=loop.epoch + loop.epoch_samples / self.epoch_len,
            samples=loop.samples, wall_time=self.clock(), world_size=self.size, method=self.method,
            mode=o.mode, center_path=str(center_path) if center_path is not None else None,
            steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
            best_center_test_error=self.best[0] if self.best else None,
            best_step=self.best[1] if self.best else None,
            horovod_cycle_time_ms=float(effective_settings()["HOROVOD_CYCLE_TIME"]),
        )
        stats = self.comm_stats()
        if self.kind == "elastic":
            self.summary.update(
                rounds=int(stats.get("rounds", 0)), bytes_communicated=stats.get("bytes_communicated"),
                skipped_rounds=int(stats.get("skipped_rounds", 0)),
                comm_share=stats.get("wait_seconds", 0.0) / max(1e-9, self.clock()))
        checkpoints = len(ckpt.list_checkpoints(self.run_dir)) if self.rank == 0 else 0
        for line in summary_lines(self.summary, self.best, self.run_dir, checkpoints,
                                  bool(cfg.log.tensorboard)):
            self.console.say(line, always=True)
        return dict(self.summary)

    def run(self) -> Dict[str, Any]:
        """Train and finish; through ``hvd.elastic.run`` when the job is elastic."""
        try:
            if self.cfg.elastic.enabled:
                return self.run_elastic()
            self.train_loop()
            return self.finish()
        finally:
            self.close_outputs()
            if self.kind == "elastic" and hasattr(self.opt, "close"):
                self.opt.close()

    # ------------------------------------------------------------------ Horovod Elastic

    def run_elastic(self) -> Dict[str, Any]:
        """Run ``train_loop`` and ``finish`` under ``hvd.elastic.run`` with a
        :class:`TrainerState`."""
        import horovod.torch as hvd

        from hvd_easgd.optim import elastic_launch

        if not elastic_launch():
            raise ConfigError(
                "elastic.enabled is true but this job was not started by an elastic horovodrun: "
                "launch it with launch/run_elastic.sh (horovodrun --min-np/--max-np "
                "--host-discovery-script), or set elastic.enabled=false")
        if self.solo:
            raise ConfigError(f"optimizer.method={self.method} trains one worker alone; "
                              "elastic training needs a distributed method")
        self.elastic_state = trainer_state_class()(self)

        @hvd.elastic.run
        def body(state) -> Dict[str, Any]:
            if state.needs_resync:  # hosts only removed: Horovod skipped the sync
                state.resync()
            self.train_loop()
            return self.finish()

        return body(self.elastic_state)

    def rewind(self, loop: LoopState) -> None:
        """Back to `loop`, the last commit (a lost worker rolled the job back)."""
        self.loop = replace(loop)
        self.clock = Stopwatch(loop.wall_time)

    def resync(self, state: Any) -> None:
        """After a (re)start, on every worker of the new world (a collective): the job's run
        directory and the loop state from the lowest-ranked survivor (at the job's start, from
        :meth:`start_job`), this world's data shards, and rank 0's outputs continuing from that
        step; rank 0 says which hosts left and joined."""
        import horovod.torch as hvd

        self.close_outputs()
        old_rank = self.rank
        self.rank, self.size = hvd.rank(), hvd.size()
        everyone = hvd.allgather_object((state.trained, self.job is not None, _hostname()),
                                        name="hvd_easgd.train.trainer.who")
        self.build_loaders()
        first = not any(job for _, job, _ in everyone)
        if first:
            self.start_job()
        root = next((r for r, (alive, _, _) in enumerate(everyone) if alive),
                    next((r for r, (_, job, _) in enumerate(everyone) if job), 0))
        mine = (replace(self.loop, wall_time=self.clock()), self.job, self.hosts, self.best)
        loop, job, before, best = hvd.broadcast_object(mine, root_rank=root,
                                                       name="hvd_easgd.train.trainer.loop")
        self.best, self.hosts = best, [h for _, _, h in everyone]
        self.adopt_job(job)
        self.rewind(loop)
        self.set_position(loop.epoch_samples, loop.world_size)
        self.plan_total_steps()
        if not first:
            self.meter.clear()
        self.open_outputs(resume_step=loop.step)
        self.last = {"step": loop.step, "wall": self.clock(), "stats": self.comm_stats()}
        if first:
            self.announce()
            if self.resume_note:
                self.console.say(self.resume_note, always=True)
        else:
            moved = f" (this process was rank {old_rank})" if old_rank != self.rank else ""
            self.console.say(f"elastic reset: {self.size} worker(s), continuing from step "
                             f"{loop.step} (epoch {loop.epoch}); "
                             f"{host_changes(before, self.hosts)}{moved}", always=True)

    def start_job(self) -> None:
        """The job's first sync (a collective; the elastic optimizer is synced): rank 0 picks the
        run directory and the checkpoint to resume from, as outside an elastic launch, every
        worker restores that checkpoint, and ``self.job`` records what a worker that joins later
        takes over (run directory, metrics origin, counters of earlier runs, the console's
        start)."""
        import time

        self.cfg, self.run_dir, payload = open_run(self.cfg, *self.elastic_start, self.rank)
        if payload is not None:
            if int(payload["world_size"]) != self.size:
                self.restart_from_center(payload)
            self.restore_from_checkpoint(payload)
            self.resumed = True
            self.clock = Stopwatch(self.loop.wall_time)
        self.job = {"run_dir": str(self.run_dir),
                    "origin": (self.origin if payload else None) or time.time(),
                    "stats_base": dict(self.stats_base), "started": time.time(),
                    "start_step": self.loop.step}

    def adopt_job(self, job: Dict[str, Any]) -> None:
        """Take the job's settings from the broadcast of :meth:`resync`."""
        self.job = dict(job)
        self.run_dir = Path(job["run_dir"])
        self.cfg = with_run_dir(self.cfg, job["run_dir"])
        self.origin = job["origin"]
        self.stats_base = dict(job["stats_base"])


def trainer_state_class():
    """:class:`TrainerState`, built on first use (Horovod's elastic module is imported then)."""
    import horovod.torch as hvd

    class TrainerState(hvd.elastic.TorchState):
        """Horovod's TorchState (model + optimizer) plus the trainer's loop state.

        ``trained``: this process has taken part in a sync of this job (its loop state is the
        job's). ``needs_resync``: a reset happened; the sync (or, when Horovod skips it because
        hosts were only removed, the start of the elastic body) brings the trainer to the new
        world."""

        def __init__(self, trainer: Trainer) -> None:
            self.trainer = trainer
            self.saved_loop = replace(trainer.loop)
            self.trained = False
            self.needs_resync = False
            super().__init__(model=trainer.model, optimizer=trainer.opt)

        def save(self) -> None:
            super().save()
            self.saved_loop = replace(self.trainer.loop, wall_time=self.trainer.clock())

        def restore(self) -> None:
            super().restore()
            self.trainer.rewind(self.saved_loop)

        def reset(self) -> None:
            super().reset()
            self.needs_resync = True

        def resync(self) -> None:
            """Bring the trainer to this world (a collective)."""
            self.trainer.resync(self)
            self.needs_resync = False

        def sync(self) -> None:
            super().sync()
            self.resync()
            self.trained = True
            self.save()  # what every worker agreed on (a resumed checkpoint too) is the commit

    return TrainerState


def _hostname() -> str:
    """The host Horovod placed this worker on (as the discovery script names it)."""
    import os
    import socket

    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def host_changes(before: list, now: list) -> str:
    """Which hosts left and which joined between two worlds (one host name per rank), e.g.
    ``127.0.0.1 left`` or ``node3 joined (2 workers)``."""
    from collections import Counter

    old, new = Counter(before), Counter(now)

    def names(counts: Counter) -> str:
        return ", ".join(h if n == 1 else f"{h} ({n} workers)" for h, n in sorted(counts.items()))

    parts = [f"{names(old - new)} left" if old - new else "",
             f"{names(new - old)} joined" if new - old else ""]
    return "; ".join(p for p in parts if p) or "same hosts"
