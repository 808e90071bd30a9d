"""What a run records: TensorBoard scalars, a JSON-lines file, and metric averaging.

(What a person reads on the console is :mod:`hvd_easgd.train.console`.)

Only rank 0 writes. Every log event is one JSON object per line in `RUN_DIR/metrics.jsonl` (next
to the TensorBoard event files) with the keys

    step, epoch, wall_time, samples                       always
    train/loss, lr, samples_per_sec, workers,
    comm/seconds_per_round, comm/wait_seconds, comm/bytes,
    comm/skipped_rounds, comm/cross_group_bytes,
    distance_to_center                                     at training log events
    center/test_error, center/test_loss,
    local/test_error, local/test_loss                      at evaluations

`hvd-easgd-plot` reads exactly these keys. Units: `wall_time` is seconds of training since the run
started, excluding evaluation and checkpoint time and continued across `--resume` (the paper plots
against it); `samples` is the number of training samples processed by all workers together;
`*/test_error` is a fraction in [0, 1]; `workers` is hvd.size() (it changes under Horovod
Elastic); `comm/skipped_rounds` counts rounds no worker applied because some worker's
contribution was NaN/inf; `comm/cross_group_bytes` is the part of `comm/bytes` handed to
collectives between groups (with `optimizer.hierarchy`: the bytes on the slow links); `comm/bytes` is the cumulative number of bytes this worker
(rank 0) sent in exchanges since the run started; `comm/wait_seconds` is the cumulative time the
training thread waited for communication; `comm/seconds_per_round` is the mean duration of one
exchange round over the last log interval. TensorBoard gets the same scalars with `global_step =
step`, and their event wall time is set to the run's origin + `wall_time`, so TensorBoard's
"relative" time axis is training time too.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

METRICS_FILE = "metrics.jsonl"

KEYS = (
    "train/loss", "center/test_error", "center/test_loss", "local/test_error", "local/test_loss",
    "lr", "samples_per_sec", "workers", "comm/seconds_per_round", "comm/wait_seconds", "comm/bytes",
    "comm/skipped_rounds", "comm/cross_group_bytes", "distance_to_center",
)
BASE_KEYS = ("step", "epoch", "wall_time", "samples")


# --------------------------------------------------------------------------------------------
# Averaging across workers
# --------------------------------------------------------------------------------------------


def allreduce_sum(values: Iterable[float], name: str) -> list:
    """Sum a few numbers over all workers in one allreduce (float64)."""
    import horovod.torch as hvd

    t = torch.tensor(list(values), dtype=torch.float64)
    if hvd.size() == 1:
        return t.tolist()
    return hvd.allreduce(t, op=hvd.Sum, name=name).tolist()


def allreduce_mean(values: Mapping[str, float], name: str) -> Dict[str, float]:
    """{key: mean over workers}; every worker must pass the same keys in the same order."""
    import horovod.torch as hvd

    keys = list(values)
    sums = allreduce_sum([float(values[k]) for k in keys], name)
    return {k: s / hvd.size() for k, s in zip(keys, sums)}


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


class MetricsLogger:
    """Rank 0's sink for log events: metrics.jsonl + TensorBoard. Inactive (no-op) elsewhere."""

    def __init__(
        self,
        run_dir: os.PathLike,
        *,
        active: bool,
        tensorboard: bool = True,
        resume_step: Optional[int] = None,
        origin: Optional[float] = None,
    ):
        self.active = active
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.origin = time.time() if origin is None else origin
        self._writer = None
        self._file = None
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint by a run that then died.
            self._writer = SummaryWriter(
                log_dir=str(self.run_dir),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, step: int, epoch: float, wall_time: float, samples: int, metrics: Mapping[str, float]) -> Dict[str, Any]:
        record: Dict[str, Any] = {
            "step": int(step), "epoch": float(epoch), "wall_time": float(wall_time), "samples": int(samples),
        }
        for k, v in metrics.items():
            if v is None:
                continue
            record[k] = float(v)
        if not self.active:
            return record
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._writer is not None:
            walltime = self.origin + wall_time
            for k, v in record.items():
                if k in ("step",):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                self._writer.add_scalar(k, v, global_step=step, walltime=walltime)
        return record

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        if not self.active or self._writer is None:
            return
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        final = {f"hparam/{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._writer.add_hparams(hp, final, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def truncate_after(path: Path, step: int) -> None:
    """Keep the lines of a metrics file whose step <= `step` (events the resumed run will redo go)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash
    from hvd_easgd.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, ("".join(line + "\n" for line in kept)).encode("utf-8"))


def read_metrics(path: os.PathLike) -> list:
    """The records of a metrics.jsonl file (or of RUN_DIR/metrics.jsonl)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


class Stopwatch:
    """Accumulated seconds of training, pausable (evaluation and checkpoints are not training)."""

    def __init__(self, offset: float = 0.0):
        self.offset = float(offset)
        self._started: Optional[float] = None

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def pause(self) -> None:
        if self._started is not None:
            self.offset += time.perf_counter() - self._started
            self._started = None

    @property
    def running(self) -> bool:
        return self._started is not None

    def __call__(self) -> float:
        if self._started is None:
            return self.offset
        return self.offset + time.perf_counter() - self._started


__all__ = [
    "METRICS_FILE", "KEYS", "BASE_KEYS", "allreduce_sum", "allreduce_mean", "MetricsLogger",
    "truncate_after", "read_metrics", "Stopwatch",
]
