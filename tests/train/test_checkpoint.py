"""Atomic checkpoints: a crash mid-write never damages or replaces the previous checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_easgd.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def payload(value: float) -> dict:
    return {"center": {"w": torch.full((4, 3), value)}, "workers": [{"x": torch.tensor([value])}],
            "epoch": 1, "config": {"name": "t"}}


def test_save_list_load_and_prune(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(tmp_path, step, payload(step), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [15, 20]
    path, data = ckpt.load_latest(tmp_path)
    assert path.name == "ckpt-000000020.pt" and data["step"] == 20
    assert torch.equal(data["center"]["w"], torch.full((4, 3), 20.0))
    assert data["format"] == ckpt.FORMAT
    # a checkpoint loads with weights_only=True: tensors, numbers, strings and containers only
    torch.load(path, weights_only=True)


def test_crash_mid_write_leaves_previous_intact(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 10, payload(1.0))
    before = (tmp_path / "checkpoints" / "ckpt-000000010.pt").read_bytes()

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 20, payload(2.0))
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10]
    assert (tmp_path / "checkpoints" / "ckpt-000000010.pt").read_bytes() == before
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    path, data = ckpt.load_latest(tmp_path)
    assert data["step"] == 10


def test_killed_process_mid_write(tmp_path):
    """A real crash: the writer is SIGKILLed while the temp file is half written."""
    ckpt.save_checkpoint(tmp_path, 10, payload(1.0))
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from hvd_easgd.train import checkpoint as ckpt

        def write(f):
            f.write(b"PK\\x03\\x04" + b"x" * 100000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)

        ckpt.atomic_write(ckpt.checkpoint_path({str(tmp_path)!r}, 20), write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed writer should have left its temporary file"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10]
    path, data = ckpt.load_latest(tmp_path)
    assert data["step"] == 10 and torch.equal(data["center"]["w"], torch.full((4, 3), 1.0))
    # the next successful save cleans the leftover up
    ckpt.save_checkpoint(tmp_path, 30, payload(3.0))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_corrupt_newest_is_never_picked(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, payload(1.0), keep=5)
    good = ckpt.checkpoint_path(tmp_path, 20)
    ckpt.save_checkpoint(tmp_path, 20, payload(2.0), keep=5)
    # truncate the newest (e.g. a copy that stopped half way) and add a foreign file
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    torch.save({"not": "ours"}, ckpt.checkpoint_path(tmp_path, 30))
    (tmp_path / "checkpoints" / "ckpt-000000040.pt.partial").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, loaded = ckpt.load_latest(tmp_path)
    assert loaded["step"] == 10


def test_no_checkpoint(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    assert ckpt.list_checkpoints(tmp_path / "nope") == []


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt.get_rng_state()
    # through a weights_only checkpoint file
    ckpt.save_checkpoint(tmp_path, 1, {"rng": state})
    _, loaded = ckpt.load_latest(tmp_path)
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_export_state_dict_is_plain_and_loadable(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    path = ckpt.export_state_dict(model.state_dict(), tmp_path / "center.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(torch.load(path))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["center.pt"]
