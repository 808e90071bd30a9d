"""Where a run writes and what it continues from: the run directory and the checkpoint to
resume, decided by rank 0 and the same on every worker.

:func:`open_run` is a collective. Outside an elastic launch the command line calls it before
building the :class:`~hvd_easgd.train.trainer.Trainer`; under one, the job's first elastic sync
calls it, so that nothing collective runs before ``hvd.elastic.run``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from hvd_easgd.train import checkpoint as ckpt
from hvd_easgd.train.config import ConfigError, DictConfig, config_from_dict, diff_configs, with_run_dir
from hvd_easgd.train.console import log_on_rank0, warn_on_rank0
from hvd_easgd.train.metrics import allreduce_sum

#: Set to 1 to always send the checkpoint from rank 0 instead of letting every worker read it.
RESUME_BROADCAST_ENV = "HVD_EASGD_RESUME_BROADCAST"


def broadcast_object(obj, rank: int, name: str):
    """Rank 0's `obj` on every worker (the object itself in a world of one)."""
    import horovod.torch as hvd

    if hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj if rank == 0 else None, root_rank=0, name=name)


def fingerprint(payload: dict) -> list:
    """What identifies one checkpoint of one run (`origin` is the run's first start time)."""
    return [int(payload["step"]), float(payload.get("origin") or 0.0), float(payload["wall_time"])]


def fresh_default_run_dir(base: Path, resume: bool, rank: int) -> Path:
    """The default run directory: ``runs/<name>``, or, when that already holds a run and this is
    not a resume, the first free ``runs/<name>-2``, ``-3``, ... so re-running a command never
    touches an earlier run. Rank 0 decides (workers may not share a file system)."""
    choice = base
    if rank == 0 and not resume:
        n = 1
        while ckpt.list_checkpoints(choice) or (choice / "metrics.jsonl").exists():
            n += 1
            choice = base.with_name(f"{base.name}-{n}")
    choice = Path(broadcast_object(str(choice), rank, "hvd_easgd.run_dir"))
    if choice != base:
        log_on_rank0(f"{base} already holds a run; writing this one to {choice} (--resume "
                     f"continues {base}; --run-dir chooses)", rank)
    return choice


def open_run(cfg: DictConfig, run_dir: Optional[Union[str, os.PathLike]], resume: bool,
             rank: int) -> Tuple[DictConfig, Path, Optional[dict]]:
    """(the config with its ``run_dir`` set, the run directory, the checkpoint payload or None):
    the same on every worker.

    A collective: rank 0 decides and tells the others. A directory that already holds
    checkpoints is an error without `resume`; with it, the newest checkpoint that loads is
    returned (a warning when its config differs from `cfg`, and a fresh start when there is
    none)."""
    if run_dir is None and not cfg.run_dir:
        run_dir = fresh_default_run_dir(Path("runs") / (cfg.name or "run"), resume, rank)
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    cfg = with_run_dir(cfg, run_dir)
    state = find_resume(run_dir, resume, rank)
    if state is not None:
        old = config_from_dict(state["config"], source=f"config in checkpoint {state['step']}")
        changed = [k for k in diff_configs(old, cfg) if k not in ("run_dir",)]
        if changed:
            warn_on_rank0("resuming with a config that differs from the checkpoint's in: "
                          f"{', '.join(changed)}", rank)
    return cfg, run_dir, state


def find_resume(run_dir: Path, resume: bool, rank: int) -> Optional[dict]:
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
                decision.update(path=str(path.resolve()), fingerprint=fingerprint(payload))
    decision = broadcast_object(decision, rank, "hvd_easgd.resume.header")
    if "error" in decision:
        raise ConfigError(decision["error"])
    if decision.get("none"):
        warn_on_rank0(f"--resume: no readable checkpoint in {run_dir}; starting from scratch", rank)
        return None
    if not decision:
        return None
    return load_everywhere(Path(decision["path"]), decision["fingerprint"], payload, rank)


def load_everywhere(path: Path, expected: list, payload: Optional[dict], rank: int) -> dict:
    """Every worker gets rank 0's checkpoint: read from the file where a worker sees the same file
    (a shared file system), else sent by rank 0 (local disks, or a stale copy on another node)."""
    if rank != 0 and os.environ.get(RESUME_BROADCAST_ENV, "0") in ("", "0"):
        try:
            payload = ckpt.load_checkpoint(path)
            if fingerprint(payload) != expected:  # same name, another run or another save
                payload = None
        except Exception:  # noqa: BLE001 - not there or unreadable: rank 0 sends it
            payload = None
    missing = allreduce_sum([0.0 if payload is not None else 1.0], name="hvd_easgd.resume.missing")[0]
    if missing > 0:
        got = ckpt.broadcast_bytes(ckpt.serialize(payload) if rank == 0 else None,
                                   "hvd_easgd.resume.payload")
        if payload is None:
            payload = ckpt.deserialize(got)
    return payload
