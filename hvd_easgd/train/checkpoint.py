"""Atomic checkpoints of a training run, and the exported center.

Layout of a run directory::

    RUN_DIR/config.yaml                    the resolved config
    RUN_DIR/checkpoints/ckpt-000001200.pt  one file per checkpoint, named by the step (9 digits)
    RUN_DIR/center.pt                      the final center as a plain state_dict

Every file is written atomically: to a temporary file in the same directory (a name that never
matches the checkpoint pattern), flushed and fsync'ed, moved over the final name with os.replace,
and the directory is fsync'ed. A crash mid-write therefore leaves the previous checkpoint intact and
at most a stray `.tmp-*` file, which `list_checkpoints` ignores and the next successful save removes.
`load_latest` also survives a final-named file that is corrupt (for instance copied in by hand, or
damaged on disk): it warns and falls back to the next older checkpoint.

A checkpoint is a dict (see `train.py` for what the trainer puts in it) holding tensors, numbers,
strings and containers only, so it loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import io
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

FORMAT = "hvd_easgd.checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
CENTER_FILE = "center.pt"
_NAME = re.compile(r"^ckpt-(\d{9,})\.pt$")
_TMP_PREFIX = ".tmp-"

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write_fn) -> Path:
    """Call write_fn(binary file) on a temp file next to `path`, fsync, then rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=str(path.parent))
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------------------------
# RNG states (as tensors and plain values, so checkpoints load with weights_only=True)
# --------------------------------------------------------------------------------------------


def get_rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_worker_rng(seed: int, rank: int, step: int) -> None:
    """Seed torch, numpy and python's RNGs for worker ``rank`` from step ``step``: a fresh start,
    or a resume whose checkpoint holds no RNG state for this worker (another world size)."""
    s = (int(seed) * 1_000_003 + int(rank) * 7919 + int(step)) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt-{int(step):09d}.pt"


def list_checkpoints(run_dir: PathLike) -> List[Tuple[int, Path]]:
    """[(step, path)] of the final-named checkpoint files, oldest first (temp files ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(run_dir: PathLike, step: int, payload: Dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` and stray temp files."""
    data = dict(payload)
    data["format"] = FORMAT
    data["step"] = int(step)
    path = atomic_torch_save(data, checkpoint_path(run_dir, step))
    prune(run_dir, keep)
    return path


def prune(run_dir: PathLike, keep: int) -> None:
    ckpts = list_checkpoints(run_dir)
    for _, p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        try:
            p.unlink()
        except OSError:
            pass
    d = checkpoint_dir(run_dir)
    if d.is_dir():  # leftovers of writes that crashed (ours are gone by now: we are the only writer)
        for p in d.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                try:
                    p.unlink()
                except OSError:
                    pass


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    data = torch.load(str(path), map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a hvd_easgd checkpoint (format {FORMAT!r})")
    return data


def load_latest(run_dir: PathLike, map_location: Any = "cpu") -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint that loads, or None. Unreadable ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except Exception as e:  # truncated zip, wrong format, pickle error: never pick it
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
    return None


def latest_readable(run_dir: PathLike) -> Optional[Path]:
    found = load_latest(run_dir)
    return None if found is None else found[0]


# --------------------------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------------------------


def export_state_dict(state_dict: Dict[str, torch.Tensor], path: PathLike) -> Path:
    """Save a plain state_dict (CPU tensors) atomically: `model.load_state_dict(torch.load(path))`."""
    plain = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    return atomic_torch_save(plain, path)


def to_cpu(obj: Any) -> Any:
    """Deep-copy tensors in a nested structure to the CPU (for gathering and saving)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialize(data: bytes, map_location: Any = "cpu") -> Any:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


# --------------------------------------------------------------------------------------------
# Moving checkpoint data between workers
# --------------------------------------------------------------------------------------------
# Like hvd.allgather_object / hvd.broadcast_object, but the bytes become a tensor through the
# buffer protocol: Horovod's versions build the tensor byte by byte (about 0.2 s per MB, minutes
# for a large model's state), and allgather would hold every worker's state on every worker.


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def gather_bytes(data: bytes, name: str) -> Optional[List[bytes]]:
    """Every worker's `data` in rank order on rank 0 (None elsewhere), one worker at a time:
    peak memory on the other ranks is one worker's share, and no single collective carries more
    than one worker's state (Horovod has no gather; one broadcast per rank does it)."""
    import horovod.torch as hvd

    if hvd.size() == 1:
        return [data]
    rank = hvd.rank()
    out: List[bytes] = []
    for root in range(hvd.size()):
        got = broadcast_bytes(data if rank == root else None, f"{name}.from{root}", root_rank=root)
        if rank == 0:
            out.append(got)
    return out if rank == 0 else None


def broadcast_bytes(data: Optional[bytes], name: str, root_rank: int = 0) -> bytes:
    """Rank `root_rank`'s `data` on every worker (others pass None)."""
    import horovod.torch as hvd

    if hvd.size() == 1:
        return data if data is not None else b""
    mine = hvd.rank() == root_rank
    size = torch.tensor([len(data) if mine else 0], dtype=torch.int64)
    size = int(hvd.broadcast(size, root_rank, name=f"{name}.size").item())
    buf = _bytes_tensor(data) if mine else torch.zeros(size, dtype=torch.uint8)
    return hvd.broadcast(buf, root_rank, name=f"{name}.data").numpy().tobytes()


__all__ = [
    "FORMAT", "CENTER_FILE", "atomic_write", "atomic_write_bytes", "atomic_torch_save",
    "get_rng_state", "set_rng_state", "checkpoint_dir", "checkpoint_path", "list_checkpoints",
    "save_checkpoint", "prune", "load_checkpoint", "load_latest", "latest_readable",
    "export_state_dict", "to_cpu", "serialize", "deserialize", "gather_bytes", "broadcast_bytes",
]
