"""`hvd-easgd-train` under Horovod Elastic as a user starts it: `launch/run_elastic.sh`.

Workers that join (a new host, a host removed from the discovery output and added back, a
killed worker's host back after its blacklist cooldown) are taken in and start from the center;
`--resume` continues a killed elastic run. Every job here is a real elastic horovodrun whose
discovery script reads a hosts file of `localhost` and `127.0.0.1` (two hosts to Horovod);
tests/workers/train_elastic_events.py changes the hosts on schedule and waits for Horovod's
notice of each change, so the order of events does not depend on timing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvd_easgd.train.metrics import read_metrics
from tests.hvdrun import REPO, START_TIMEOUT, WORKERS, worker_env

ELASTIC = "recipes/demo/digits_elastic.yaml"
EVENTS = f"{sys.executable} {WORKERS / 'train_elastic_events.py'}"
SHORT = ["--set", "train.epochs=12", "--set", "log.console_seconds=1"]
# The launcher's inputs a developer's shell may hold; the tests set their own.
LAUNCHER_VARS = ("CONFIG", "NP", "MIN_NP", "MAX_NP", "TRAIN", "HOROVODRUN", "HOROVODRUN_ARGS",
                 "NETWORK_INTERFACE", "CLUSTER_ENV", "DRY_RUN", "DISCOVERY", "BLACKLIST_COOLDOWN")


def launcher_env(hosts_file: Path, hosts, **extra) -> dict:
    """The environment of launch/run_elastic.sh in a test: the venv's horovodrun and
    hvd-easgd-train, a 1-3 s blacklist cooldown, this test's hosts file."""
    Path(hosts_file).write_text("".join(f"{h}\n" for h in hosts))
    env = {k: v for k, v in worker_env().items() if k not in LAUNCHER_VARS}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHON=sys.executable, HOSTS_FILE=str(hosts_file), BLACKLIST_COOLDOWN="1 3",
               ELASTIC_TIMEOUT="60", HOROVODRUN_ARGS=f"--start-timeout {START_TIMEOUT}", **extra)
    return env


def launch(args, env, **kwargs):
    return subprocess.Popen(["bash", str(REPO / "launch" / "run_elastic.sh"), ELASTIC, *args],
                            cwd=str(REPO), env=env, text=True, **kwargs)


def syncs(run_dir: Path) -> dict:
    """{process: [its elastic syncs in order]} as the worker script recorded them."""
    return {p.stem[len("syncs-"):]: [json.loads(line) for line in p.read_text().splitlines()]
            for p in run_dir.glob("syncs-*.jsonl")}


def elapsed_seconds(text: str) -> list:
    return [int(h) * 3600 + int(m) * 60 + int(s)
            for h, m, s in re.findall(r"\| elapsed (\d+):(\d\d):(\d\d) \|", text)]


# ---------------------------------------------------------------------- workers that join


@pytest.fixture(scope="module")
def joiners(tmp_path_factory):
    """One job: localhost alone; 127.0.0.1 added after step 20 (a new host); localhost removed
    from the discovery output after step 60 (127.0.0.1 becomes rank 0) and added back after
    step 80; the worker on 127.0.0.1 SIGKILLed after step 140, its host back after the cooldown."""
    tmp = tmp_path_factory.mktemp("joiners")
    run_dir = tmp / "run"
    env = launcher_env(tmp / "hosts.txt", ["localhost:1"], NP="1", MIN_NP="1", MAX_NP="2",
                       TRAIN=EVENTS)
    started = time.monotonic()
    proc = launch(["--run-dir", str(run_dir), *SHORT,
                   "--hosts-at", "20=localhost:1,127.0.0.1:1", "--hosts-at", "60=127.0.0.1:1",
                   "--hosts-at", "80=127.0.0.1:1,localhost:1",
                   "--kill-host", "127.0.0.1", "--kill-at", "140"],
                  env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a joiner that hangs the job: fail with its output
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out, run_dir, time.monotonic() - started


@pytest.mark.timeout(480)
def test_joiners_are_taken_in_and_the_job_finishes_with_two_workers(joiners):
    rc, out, run_dir, _ = joiners
    assert rc == 0, out[-6000:]
    results = [json.loads(p.read_text()) for p in run_dir.glob("result-*.json")]
    # the processes that finish: the localhost worker that came back at 80, and the one that
    # came back on 127.0.0.1 after its cooldown; each trained in a world of two to the end
    assert sorted(r["host"] for r in results) == ["127.0.0.1", "localhost"], out[-4000:]
    for r in results:
        assert r["size"] == 2 and r["world_size"] == 2
        assert r["epoch"] == pytest.approx(12.0) and r["step"] == r["total_steps"]
        assert r["center/test_error"] < 0.15, r
    assert results[0]["step"] == results[1]["step"]

    seen = syncs(run_dir)
    joined = {p: s[0] for p, s in seen.items() if s[0]["step"] > 0}
    assert sorted(p.split("-")[0] for p in joined) == ["127.0.0.1", "127.0.0.1", "localhost"]
    for process, first in joined.items():
        # a joiner starts from the center, in a world of two, at the step the others are at
        assert first["size"] == 2 and first["distance"] == 0.0, (process, first)
        others = [s for p, ss in seen.items() if p != process for s in ss
                  if abs(s["time"] - first["time"]) < 30 and s["step"] == first["step"]]
        assert others, f"no survivor synced with {process} at step {first['step']}"
    for step in (20, 80):  # a host in the discovery output is taken in within seconds
        added = float((run_dir / f"hosts-at-{step}").read_text())
        first = min(s["time"] for s in joined.values() if s["time"] > added)
        assert first - added < 60, (step, first - added)


@pytest.mark.timeout(480)
def test_the_console_names_the_hosts_and_follows_rank_0(joiners):
    rc, out, run_dir, _ = joiners
    assert rc == 0, out[-6000:]
    resets = re.findall(r"^\[(\d)\]<stderr>:\[hvd-easgd rank 0\] elastic reset: (.*)$", out, re.M)
    expected = [
        ("0", r"2 worker\(s\), continuing from step 20 \(epoch 0\); 127\.0\.0\.1 joined"),
        # localhost (rank 0) removed: the process horovodrun labels [1] is rank 0 now
        ("1", r"1 worker\(s\), continuing from step 60 \(epoch \d\); localhost left "
              r"\(this process was rank 1\)"),
        ("1", r"2 worker\(s\), continuing from step 80 \(epoch \d\); localhost joined"),
        ("1", r"1 worker\(s\), continuing from step 1[24]0 \(epoch \d\); 127\.0\.0\.1 left "
              r"\(this process was rank 1\)"),
        ("1", r"2 worker\(s\), continuing from step 1\d0 \(epoch \d\); 127\.0\.0\.1 joined"),
    ]
    assert len(resets) == len(expected), resets
    for (label, text), (want_label, pattern) in zip(resets, expected):
        assert label == want_label and re.fullmatch(pattern, text), (label, text)
    # the progress line's elapsed time counts from the job's start, through every reset
    elapsed = elapsed_seconds(out)
    assert len(elapsed) > 5 and elapsed == sorted(elapsed), elapsed
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)), "every step logged once, by whichever process is rank 0"
    assert set(range(20, steps[-1], 20)) <= set(steps), "no log event lost at a reset"
    assert [r["workers"] for r in records if "workers" in r][-1] == 2


# ---------------------------------------------------------------------- --resume


@pytest.mark.timeout(480)
def test_resume_of_a_killed_elastic_run_continues_under_the_launcher(tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--set", "train.epochs=6", "--set", "checkpoint.every=40"]
    env = launcher_env(tmp_path / "hosts.txt", ["localhost:1", "127.0.0.1:1"])
    # 1. the run stops after step 41 (its checkpoint at 40 is written) until it is killed
    first = launch([*args, "--hold-at", "41"], dict(env, TRAIN=EVENTS),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_dir / "held").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never held"
        time.sleep(0.2)
    workers = psutil.Process(first.pid).children(recursive=True)
    first.send_signal(signal.SIGKILL)  # the launcher killed: Horovod stops its workers
    first.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, alive
    assert not (run_dir / "center.pt").exists()
    # 2. the user's command: hvd-easgd-train --resume under the elastic launcher
    second = launch([*args, "--resume"], env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-6000:]
    assert "[hvd-easgd rank 0] resumed from step 40 (epoch 1" in out, out[-4000:]
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)) and 40 in steps and steps[-1] == 132, steps
    walls = [r["wall_time"] for r in records]
    assert walls == sorted(walls), "training time continues from the checkpoint's"
    assert records[-1]["epoch"] == pytest.approx(6.0)
    assert (run_dir / "center.pt").exists()
    from hvd_easgd.train import checkpoint as ckpt

    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [120, 132]  # checkpoint.keep=2
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 132))["world_size"] == 2
