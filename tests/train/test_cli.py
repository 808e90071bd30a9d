"""The trainer for real: the README's digits demo (its first command), resume == uninterrupted, resume on fewer workers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hvd_easgd.train import checkpoint as ckpt
from hvd_easgd.train.metrics import KEYS, read_metrics
from tests.hvdrun import horovodrun, run_workers
from tests.train.jobs import DEMO, train_command


@pytest.mark.timeout(300)
def test_readme_demo_two_workers(demo):
    """`horovodrun -np 2 -H localhost:2 --gloo hvd-easgd-train --config recipes/demo/digits.yaml`,
    started as the launchers start it (tests/train/jobs.py): their marked default cycle (20 ms)
    gives way to the recipe's horovod.cycle_time_ms (1 ms) without a warning, and the summary
    names the cycle Horovod ran with."""
    proc, run_dir = demo
    assert "[0]<stderr>:[hvd-easgd] done: 660 steps" in proc.stderr
    assert "of training time waiting (Horovod cycle 1 ms)" in proc.stderr
    assert "from your environment replaces the recipe's" not in proc.stderr

    cfg_text = (run_dir / "config.yaml").read_text()
    assert "method: easgd" in cfg_text and "name: digits_net" in cfg_text

    records = read_metrics(run_dir)
    for r in records:
        assert {"step", "epoch", "wall_time", "samples"} <= set(r)
        assert set(r) - {"step", "epoch", "wall_time", "samples"} <= set(KEYS), r
    keys = set().union(*records)
    assert set(KEYS) <= keys, f"never logged: {set(KEYS) - keys}"
    final = [r for r in records if "center/test_error" in r][-1]
    assert final["step"] == 30 * 22  # 30 epochs of 718 samples per worker, 22 batches of 32
    assert final["center/test_error"] < 0.10, final
    assert final["samples"] == final["step"] * 32 * 2
    # wall_time is training time, so it only grows (evaluation and checkpoints do not count)
    walls = [r["wall_time"] for r in records]
    assert walls == sorted(walls) and walls[0] > 0
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert all(r["comm/bytes"] > 0 for r in train[1:])
    assert any(r["distance_to_center"] > 0 for r in train)

    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)][-1] == 660
    # the shipped model is a plain state_dict of the center
    from hvd_easgd.train.models import build_model

    model = build_model("digits_net", 10, in_channels=1, image_size=8, dropout=0.25)
    model.load_state_dict(torch.load(run_dir / "center.pt"))
    _, data = ckpt.load_latest(run_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, data["center_model"][k])
    assert len(data["workers"]) == 2 and data["world_size"] == 2


@pytest.mark.timeout(180)
def test_a_cycle_time_of_your_own_stays(tmp_path):
    """--set horovod.cycle_time_ms=3 with an unmarked HOROVOD_CYCLE_TIME=20 in the environment:
    that value is the user's: it stays, and rank 0 (only) says so. (A launcher's marked default
    giving way to the recipe's is test_readme_demo_two_workers.)"""
    env = {"HOROVOD_CYCLE_TIME": "20", "HVD_EASGD_DEFAULTED": "", "HVD_EASGD_TUNE": "1"}
    shrink = ["horovod.cycle_time_ms=3", "train.max_steps=8", "train.eval_every=0",
              "train.max_eval_batches=1", "checkpoint.every=0", "launch.np=null"]
    proc = horovodrun([*train_command(), "--config", DEMO, "--run-dir", str(tmp_path / "run"),
                       *[a for s in shrink for a in ("--set", s)]], np=2, timeout=170, env=env)
    assert "[0]<stderr>:[hvd-easgd] done: 8 steps" in proc.stderr
    assert "of training time waiting (Horovod cycle 20 ms)" in proc.stderr
    warned = proc.stderr.count("HOROVOD_CYCLE_TIME=20 from your environment replaces the recipe's")
    assert warned == 1, proc.stderr[-3000:]


@pytest.mark.timeout(180)
def test_a_stopped_run_exits_3_and_horovodrun_says_so(tmp_path):
    """As docs/elastic-training.md says: every worker exits 3 when training stops (divergence here);
    horovodrun names that status in its closing error and itself exits 1."""
    proc = horovodrun([*train_command(), "--config", DEMO, "--run-dir", str(tmp_path / "run"),
                       "--set", "optimizer.lr=1000", "--set", "log.every=5",
                       "--set", "train.eval_every=0", "--set", "checkpoint.every=0"],
                      np=1, timeout=170, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "hvd-easgd-train: training stopped: training diverged" in text
    assert "Exit code: 3" in text


CASES = {
    # sync EASGD (dropout on: the RNG state must be restored exactly)
    "easgd_sync": ["optimizer.method=easgd", "optimizer.mode=sync", "optimizer.tau=4"],
    # async EAMSGD: momentum buffers, delayed rounds; tau does not divide the checkpoint step
    "eamsgd_async": ["optimizer.method=eamsgd", "optimizer.mode=async", "optimizer.tau=4",
                     "optimizer.lr=0.01"],
}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _comparable(records):
    drop = ("wall_time", "samples_per_sec", "comm/seconds_per_round", "comm/wait_seconds")
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


@pytest.mark.timeout(420)
def test_resume_equals_uninterrupted_and_regrow(tmp_path):
    cases = json.dumps(CASES)
    first = run_workers("train_resume.py", tmp_path, np=2, args=["--phase", "first", "--cases", cases])
    for name in CASES:
        assert first[0][name]["stopped"] is True
        stopped = tmp_path / name / "stopped"
        # the preempted run got a mid-epoch checkpoint at 18 (22 steps per epoch) and none after
        assert [s for s, _ in ckpt.list_checkpoints(stopped)] == [9, 18]
        assert not (stopped / "center.pt").exists()
        shutil.copytree(stopped, tmp_path / name / "regrow")
    centers_at_18 = {name: ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / name / "stopped", 18))["center"]
                     for name in CASES}

    # eamsgd_async: rank 0 sends the checkpoint (as when the run dir is not on a shared file system)
    resumed = run_workers("train_resume.py", tmp_path, np=2,
                          args=["--phase", "resume", "--cases", cases, "--broadcast", '["eamsgd_async"]'])
    for name in CASES:
        full_dir, res_dir = tmp_path / name / "full", tmp_path / name / "stopped"
        a = torch.load(full_dir / "center.pt")
        b = torch.load(res_dir / "center.pt")
        assert _same_state(a, b), f"{name}: the resumed center differs from the uninterrupted one"
        # every worker's local model and optimizer state match too
        _, ca = ckpt.load_latest(full_dir)
        _, cb = ckpt.load_latest(res_dir)
        assert ca["step"] == cb["step"] == 30
        for wa, wb in zip(ca["workers"], cb["workers"]):
            assert _same_state(wa["model"], wb["model"])
        # the logs agree step by step (times aside), with the redone steps 19..22 logged once
        assert _comparable(read_metrics(full_dir)) == _comparable(read_metrics(res_dir))
        sa, sb = first[0][name]["full"], resumed[0][name]["resumed"]
        assert sa["center/test_error"] == sb["center/test_error"]
        assert sa["samples"] == sb["samples"] == 30 * 32 * 2
        assert sb["wall_time"] > 0

    # Resume on ONE worker: warned, every worker restarts from the center, fresh local optimizer.
    regrow = run_workers("train_resume.py", tmp_path, np=1,
                         args=["--phase", "regrow", "--cases", cases, "--extra", '["train.max_steps=18"]'])
    warnings_text = "\n".join(regrow[0]["warnings"])
    assert "resuming a run of 2 workers with 1" in warnings_text
    for name in CASES:
        summary = regrow[0][name]["regrow"]
        assert summary["world_size"] == 1 and summary["step"] == 18
        # no step was taken: the local model IS the center
        assert summary["local/test_error"] == summary["center/test_error"]
        assert summary["local/test_loss"] == summary["center/test_loss"]
        regrown = torch.load(tmp_path / name / "regrow" / "center.pt")
        # the regrown run's center is the 2-worker checkpoint's center
        assert _same_state(regrown, {k: centers_at_18[name][k] for k in regrown})


# ------------------------------------------------------------------------------------------
# The pieces, without Horovod
# ------------------------------------------------------------------------------------------


def test_metrics_logger_jsonl_and_resume_truncation(tmp_path):
    from hvd_easgd.train.metrics import MetricsLogger

    with MetricsLogger(tmp_path, active=True, tensorboard=True) as log:
        for step in (10, 20, 30):
            log.log(step, step / 10, step * 0.5, step * 64, {"train/loss": 1.0 / step, "lr": 0.1,
                                                               "comm/seconds_per_round": None})
        log.log(30, 3.0, 15.0, 1920, {"center/test_error": 0.25, "center/test_loss": 0.7})
        log.hparams({"method": "easgd", "tau": 4}, {"center/test_error": 0.25})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30, 30]
    assert records[0] == {"step": 10, "epoch": 1.0, "wall_time": 5.0, "samples": 640,
                          "train/loss": 0.1, "lr": 0.1}  # None values are left out
    assert list(tmp_path.glob("events.out.tfevents.*"))
    # a resumed run from step 20 drops what the dead run logged after it (plus a torn line)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "epo')
    with MetricsLogger(tmp_path, active=True, tensorboard=False, resume_step=20) as log:
        log.log(25, 2.5, 12.5, 1600, {"train/loss": 0.04})
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 25]
    # a fresh run (no resume) starts a new file; an inactive logger (rank > 0) writes nothing
    MetricsLogger(tmp_path, active=False).log(1, 0, 0, 0, {"lr": 1})
    with MetricsLogger(tmp_path, active=True, tensorboard=False) as log:
        pass
    assert read_metrics(tmp_path) == []


def test_stopwatch_excludes_paused_time():
    import time

    from hvd_easgd.train.metrics import Stopwatch

    clock = Stopwatch(offset=100.0)
    assert clock() == 100.0
    clock.start()
    time.sleep(0.05)
    clock.pause()
    frozen = clock()
    assert frozen >= 100.05
    time.sleep(0.05)
    assert clock() == frozen  # evaluation/checkpoint time does not count
    clock.start()
    assert clock() >= frozen


def test_rerun_without_resume_gets_afresh_default_run_dir(tmp_path, monkeypatch):
    """Re-running the README command must not fail or touch the first run: runs/<name>-2."""
    import horovod.torch as hvd

    from hvd_easgd.train.resume import fresh_default_run_dir

    hvd.init()
    monkeypatch.chdir(tmp_path)
    base = Path("runs") / "digits"
    assert fresh_default_run_dir(base, resume=False, rank=0) == base  # nothing there yet
    base.mkdir(parents=True)
    (base / "metrics.jsonl").write_text("{}\n")
    assert fresh_default_run_dir(base, resume=False, rank=0) == Path("runs/digits-2")
    (tmp_path / "runs/digits-2").mkdir()
    (tmp_path / "runs/digits-2/metrics.jsonl").write_text("{}\n")
    assert fresh_default_run_dir(base, resume=False, rank=0) == Path("runs/digits-3")
    assert fresh_default_run_dir(base, resume=True, rank=0) == base  # --resume continues it
