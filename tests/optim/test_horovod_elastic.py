"""Faults (issue 10): Horovod Elastic membership changes and non-finite workers.

Every multi-worker test here is a real Horovod job. The elastic ones run an elastic
`horovodrun` whose discovery script (launch/discover_hosts.sh) lists `localhost` and
`127.0.0.1`, which Horovod treats as two hosts; tests/workers/elastic_train.py is a Horovod
elastic script (TorchState, @hvd.elastic.run, ElasticSampler, commits) with the one-line swap,
and kills itself with SIGKILL / poisons its gradient / grows the host list on schedule.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, NamedTuple

import pytest

from tests.hvdrun import WORKERS, horovodrun_elastic, run_workers
from tests.reference import Case

TWO_HOSTS = ["localhost:1", "127.0.0.1:1"]
THREE_WORKERS = ["localhost:2", "127.0.0.1:1"]  # the worker on 127.0.0.1 is the one killed
_JOBS: dict = {}


class ElasticJob(NamedTuple):
    """A finished tests/workers/elastic_train.py job: horovodrun's process, the report of every
    worker that finished and of every worker whose training raised ({host-slot: dict}), its
    output directory, and the wall-clock time at which horovodrun had exited."""

    proc: object
    reports: Dict[str, dict]
    stopped: Dict[str, dict]
    out: Path
    ended: float


def elastic_job(tmp_path_factory, key, hosts, np, args, max_np=None, env=None) -> ElasticJob:
    """Run tests/workers/elastic_train.py once per key (shared by the tests that read it)."""
    if key not in _JOBS:
        out = tmp_path_factory.mktemp(key)
        proc = horovodrun_elastic(
            [sys.executable, str(WORKERS / "elastic_train.py"), "--out", str(out), *args],
            hosts, out / "hosts.txt", np=np, min_np=1, max_np=max_np or np, timeout=300, env=env)
        ended = time.time()
        reports = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")
                   if not p.name.startswith("stopped-")}
        stopped = {p.stem[len("stopped-"):]: json.loads(p.read_text())
                   for p in out.glob("stopped-*.json")}
        _JOBS[key] = ElasticJob(proc, reports, stopped, out, ended)
    return _JOBS[key]


def finished(job: ElasticJob) -> Dict[str, dict]:
    proc = job.proc
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert not job.stopped, job.stopped
    return job.reports


# ---------------------------------------------------------------------- a lost worker


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_one_of_two_workers(tmp_path_factory, mode):
    killed = finished(elastic_job(tmp_path_factory, f"kill2-{mode}", TWO_HOSTS, 2,
                                  ["--mode", mode, "--kill-step", "150"]))
    clean = finished(elastic_job(tmp_path_factory, f"clean2-{mode}", TWO_HOSTS, 2, ["--mode", mode]))
    assert set(killed) == {"localhost-0"}, "only the survivor finishes"
    survivor = killed["localhost-0"]
    # a lone worker is not pulled and the center follows it
    assert survivor["size"] == 1 and (survivor["alpha"], survivor["beta"]) == (0.0, 1.0)
    assert survivor["resets"] == [{"size": 1, "alpha": 0.0}]
    restart = survivor["entries"][1]
    # the victim dies before its step 150; the survivor fails at its next collective (by its
    # round at 152) and rolls back to its last commit (every 5 batches)
    assert restart["size"] == 1 and 145 <= restart["step"] <= 152
    assert not restart["fresh_optimizer_state"], "a survivor keeps its local optimizer state"
    assert restart["distance_to_center"] > 0.0, "a survivor keeps its own parameters"
    assert survivor["center_finite"]
    reference = clean["localhost-0"]["center_accuracy"]
    assert clean["localhost-0"]["center_hash"] == clean["127.0.0.1-0"]["center_hash"]
    assert survivor["center_accuracy"] >= reference - 0.03, (survivor["center_accuracy"], reference)
    if mode == "async":
        assert survivor["stats"]["dropped_rounds"] >= 1  # the round on the wire was abandoned


@pytest.mark.timeout(600)
def test_sigkill_one_of_three_survivors_agree(tmp_path_factory):
    reports = finished(elastic_job(tmp_path_factory, "kill3-async", THREE_WORKERS, 3,
                                   ["--mode", "async", "--kill-step", "100"]))
    assert set(reports) == {"localhost-0", "localhost-1"}, "the two survivors finish"
    a, b = reports["localhost-0"], reports["localhost-1"]
    for r in (a, b):
        assert r["size"] == 2 and r["alpha"] == pytest.approx(0.45) and r["center_finite"]
        assert r["entries"][-1]["size"] == 2 and not r["entries"][-1]["fresh_optimizer_state"]
    assert a["center_hash"] == b["center_hash"], "the survivors' centers must be bit-identical"
    assert a["step"] == b["step"]
    assert a["center_accuracy"] > 0.9


# ---------------------------------------------------------------------- 2 -> 1 -> 2


RESIZE_CASE = Case(name="resize", opt="nesterov", tau=3, steps=20, seed=31)


@pytest.mark.timeout(600)
def test_two_one_two_matches_the_reference(tmp_path):
    """A host removed after step 7 and added back after step 13 (Horovod's own interrupts, at
    exactly those steps): the survivor, the joiner and the center follow the reference, in
    which one worker trains as plain SGD and the center follows it."""
    from tests.reference import ElasticReference, max_abs_diff

    proc = horovodrun_elastic(
        [sys.executable, str(WORKERS / "elastic_resize.py"), "--out", str(tmp_path),
         "--case", json.dumps(RESIZE_CASE.to_dict()), "--shrink-after", "7",
         "--grow-after", "13", "--hosts-file", str(tmp_path / "hosts.txt")],
        TWO_HOSTS, tmp_path / "hosts.txt", np=2, min_np=1, max_np=2, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # Horovod picks either host as rank 0; rank 1's host leaves and comes back
    reports = sorted((json.loads(p.read_text()) for p in tmp_path.glob("*-*.json")),
                     key=lambda r: -len(r["trace"]))
    assert len(reports) == 2, "the survivor and the joiner finish"
    survivor, joiner = reports
    assert {survivor["host"], joiner["host"]} == {"localhost", "127.0.0.1"}
    assert {rank for _, _, rank in survivor["trace"]} == {0}
    sizes = {t: size for t, size, _ in survivor["trace"]}
    assert sizes == {t: 2 if t <= 7 or t > 13 else 1 for t in range(1, 21)}
    assert joiner["trace"] == [[t, 2, 1] for t in range(14, 21)]
    want = ElasticReference(RESIZE_CASE, 2, [(7, 1), (13, 2)]).run().result()
    assert survivor["center"] == joiner["center"], "the center replicas are bit-identical"
    assert max_abs_diff(survivor["center"], want["center"]) < 1e-6
    assert max_abs_diff(survivor["params"], want["params"][0]) < 1e-6
    assert max_abs_diff(joiner["params"], want["params"][1]) < 1e-6
    assert survivor["rounds"] == joiner["rounds"] == want["rounds"] == 6


# ---------------------------------------------------------------------- a worker joins


@pytest.mark.timeout(600)
def test_grow_from_one_to_two_workers(tmp_path_factory):
    """After step 100 the lone worker lists a second host and waits for Horovod's interrupt
    (tests/workers/elastic_train.py): the job grows exactly there, whatever the machine's speed."""
    reports = finished(elastic_job(tmp_path_factory, "grow", ["localhost:1"], 1,
                                   ["--mode", "sync", "--grow-step", "100", "--epochs", "4"],
                                   max_np=2))
    assert set(reports) == {"localhost-0", "127.0.0.1-0"}
    old, new = reports["localhost-0"], reports["127.0.0.1-0"]
    assert [e["size"] for e in old["entries"]] == [1, 2]
    joined = new["entries"][0]
    assert len(new["entries"]) == 1 and joined["size"] == 2 and joined["step"] == 100
    assert joined["distance_to_center"] == 0.0 and joined["fresh_optimizer_state"]
    # the worker that was there keeps its own parameters and its optimizer state
    rejoined = old["entries"][-1]
    assert rejoined["size"] == 2 and rejoined["step"] == joined["step"]
    assert rejoined["distance_to_center"] > 0.0 and not rejoined["fresh_optimizer_state"]
    for r in (old, new):
        assert r["size"] == 2 and r["alpha"] == pytest.approx(0.45)
    assert old["center_hash"] == new["center_hash"]
    assert old["step"] == new["step"]


@pytest.mark.timeout(600)
def test_joiner_with_other_settings_is_refused(tmp_path_factory):
    """The worker that joins after step 30 wraps its optimizer with tau 5 instead of 4
    (VICTIM_TAU, read by tests/workers/elastic_train.py on 127.0.0.1): it must not train with
    the others. The job's first sync after the join compares every worker's settings."""
    job = elastic_job(tmp_path_factory, "grow-other-tau", ["localhost:1"], 1,
                      ["--mode", "sync", "--grow-step", "30", "--epochs", "2"], max_np=2,
                      env={"VICTIM_TAU": "5"})
    joiner = job.stopped.get("127.0.0.1-0")
    assert joiner is not None, (job.reports, job.proc.stderr[-3000:])
    assert "127.0.0.1-0" not in job.reports, "the joiner finished a run with other settings"
    assert joiner["entries"] == [], "the joiner trained a step with other settings"
    assert joiner["type"] == "ValueError" and "settings differ: tau=" in joiner["message"]
    assert "4" in joiner["message"] and "5" in joiner["message"], joiner["message"]
    # the first worker never trained with it: it stopped with the same error, or went on alone
    first = job.stopped.get("localhost-0") or job.reports["localhost-0"]
    assert all(e["size"] == 1 for e in first["entries"]), first["entries"]
    if "localhost-0" in job.stopped:
        assert first["message"] == joiner["message"] and job.proc.returncode != 0


# ---------------------------------------------------------------------- non-finite workers

NAN_CASES = [
    {"kind": "nan", "nan_step": 5, "expect_skip": 6,
     "case": Case(name="nan-sync", opt="nesterov", tau=2, steps=14).to_dict()},
    {"kind": "nan", "nan_step": 5, "expect_skip": 8,  # sealed at 6, landed at 8
     "case": Case(name="nan-async", mode="async", opt="nesterov", tau=2, steps=14).to_dict()},
    {"kind": "nan", "nan_step": 5, "expect_skip": 6,
     "case": Case(name="nan-average", method="average", tau=2, steps=14).to_dict()},
    {"kind": "nan", "nan_step": 5, "persist": True,
     "case": Case(name="nan-persist", tau=2, steps=20).to_dict()},
    {"kind": "nan", "nan_step": 5, "value": 1e7,  # finite in fp32, inf in fp16 on the wire
     "case": Case(name="fp16-overflow", tau=2, steps=20, compression="fp16").to_dict()},
    # async: the restarted worker's next round carries the center's values and is good, so
    # bad rounds alternate with good ones; the window still stops it
    {"kind": "nan", "nan_step": 5, "persist": True,
     "case": Case(name="nan-persist-async", mode="async", tau=2, steps=40).to_dict()},
    # before EASGD starts (synchronous SGD): the averaged gradient is NaN on every worker
    {"kind": "nan", "nan_step": 5,
     "case": Case(name="nan-sync-sgd", tau=2, steps=12, extra={"sync_sgd_steps": 8}).to_dict()},
]


@pytest.fixture(scope="module")
def nan_job(tmp_path_factory):
    return run_workers("opt_nonfinite.py", tmp_path_factory.mktemp("nan"), np=2,
                       args=["--cases", json.dumps(NAN_CASES)], timeout=200)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_nan_step_is_skipped_by_everyone(nan_job, index):
    item = NAN_CASES[index]
    results = [ranks["results"][index] for ranks in nan_job]
    case = Case.from_dict(item["case"])
    for rank, res in enumerate(results):
        assert res["ok"], res.get("error")
        assert res["raised"] is None and res["finite"]
        # the center moved at every round but the bad one, and at no other step
        assert res["skips"] == [item["expect_skip"]], (rank, res["skips"])
        assert res["moved_off_schedule"] == [], (rank, res["moved_off_schedule"])
        # counted at Horovod: one allreduce per round (the bad one too), nothing more
        assert res["allreduces"] == case.steps // case.tau, (rank, res["allreduces"])
    assert results[1]["restart_on_center"] == [True], "rank 1 restarts from the center, fresh state"
    assert results[0]["center_hash"] == results[1]["center_hash"]


@pytest.mark.timeout(300)
def test_persistent_nan_stops_every_worker(nan_job):
    raised = [ranks["results"][3]["raised"] for ranks in nan_job]
    for r in raised:
        assert r is not None and r["type"] == "NonFiniteError"
        assert "rank(s) 1" in r["message"] and "lower the learning rate" in r["message"]
        assert r["step"] == 10  # bad rounds at 6, 8, 10: patience 3
    assert raised[0]["message"] == raised[1]["message"]


@pytest.mark.timeout(300)
def test_persistent_nan_stops_an_async_job(nan_job):
    results = [ranks["results"][5] for ranks in nan_job]
    raised = [r["raised"] for r in results]
    for r in raised:
        assert r is not None and r["type"] == "NonFiniteError", results
        assert "rank(s) 1" in r["message"] and "of the last 6 rounds" in r["message"]
    assert raised[0] == raised[1]
    # rounds seal at 6, 8, ... and land a round later; every other one is bad
    assert len(results[0]["skips"]) == 2 and raised[0]["step"] <= 20, results[0]["skips"]


@pytest.mark.timeout(300)
def test_one_nan_step_before_easgd_starts_is_skipped(nan_job):
    results = [ranks["results"][6] for ranks in nan_job]
    for res in results:
        assert res["raised"] is None and res["finite"]
        assert res["skips"] == [5] and res["moved_off_schedule"] == []
    assert results[0]["center_hash"] == results[1]["center_hash"]


@pytest.mark.timeout(300)
def test_fp16_overflow_on_the_wire_is_caught(nan_job):
    # Every contribution is finite in fp32, but rank 1's no longer fits in fp16: the sum on the
    # wire is inf. Nobody is to blame, so nobody restarts; the center never takes it in.
    results = [ranks["results"][4] for ranks in nan_job]
    assert results[1]["restart_on_center"] == [False, False]
    for res in results:
        assert res["skips"] == [6, 8] and res["moved_off_schedule"] == []
        r = res["raised"]
        assert r is not None and r["type"] == "NonFiniteError" and r["step"] == 10
        assert "the sum on the wire" in r["message"] and "Compression.none" in r["message"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_persistent_nan_ends_an_elastic_job_quickly(tmp_path_factory, mode):
    """127.0.0.1's gradient is NaN from step 100 on: every worker stops with NonFiniteError at
    the same step, soon after the first bad step (timed from it, not from the launch)."""
    job = elastic_job(tmp_path_factory, f"nan-persist-{mode}", TWO_HOSTS, 2,
                      ["--nan-step", "100", "--nan-persist", "--mode", mode])
    assert job.proc.returncode != 0 and not job.reports, job.reports
    assert set(job.stopped) == {"localhost-0", "127.0.0.1-0"}, "every worker says why it stopped"
    first_bad = float((job.out / "nan_started").read_text())
    for worker, stop in job.stopped.items():
        assert stop["type"] == "NonFiniteError", (worker, stop)
        assert "lower the learning rate" in stop["message"], (worker, stop["message"])
        assert 100 < stop["step"] < 100 + 10 * 4, (worker, stop["step"])  # a window of rounds
        assert stop["time"] - first_bad < 30, (worker, stop["time"] - first_bad)
    assert len({(s["step"], s["message"]) for s in job.stopped.values()}) == 1, job.stopped
    text = job.proc.stdout + job.proc.stderr
    assert "NonFiniteError" in text and "lower the learning rate" in text
    assert job.ended - first_bad < 60, job.ended - first_bad  # and the job is over


# ---------------------------------------------------------------------- the trainer


@pytest.mark.timeout(600)
def test_trainer_elastic_survives_sigkill(tmp_path):
    """`hvd-easgd-train` with an elastic: section: a worker SIGKILLed at step 200 of 264."""
    run_dir = tmp_path / "run"
    proc = horovodrun_elastic(
        [sys.executable, str(WORKERS / "train_elastic.py"), "--config",
         "recipes/demo/digits_elastic.yaml", "--run-dir", str(run_dir), "--kill-step", "200",
         "--set", "log.progress=false", "--set", "train.epochs=12", "--set", "checkpoint.every=100"],
        TWO_HOSTS, tmp_path / "hosts.txt", np=2, min_np=1, max_np=2, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (run_dir / "killed").read_text() == "200"
    results = [json.loads(p.read_text()) for p in run_dir.glob("result-*.json")]
    assert len(results) == 1 and results[0]["size"] == 1
    summary = results[0]
    assert summary["epoch"] == pytest.approx(12.0), "12 epochs, whatever the number of workers"
    assert summary["center/test_error"] < 0.10
    assert "elastic reset: 1 worker(s), continuing from step 180" in proc.stderr
    from hvd_easgd.train.metrics import read_metrics

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "no step logged twice"
    workers = [r["workers"] for r in records if "workers" in r]
    assert workers[0] == 2 and workers[-1] == 1
    assert (run_dir / "center.pt").exists() and list((run_dir / "checkpoints").glob("*.pt"))


@pytest.mark.timeout(300)
def test_trainer_stops_on_divergence(tmp_path):
    """lr = 1000 on the demo: every worker stops with a clear error and a non-zero exit."""
    from tests.hvdrun import horovodrun

    started = time.monotonic()
    proc = horovodrun([sys.executable, "-m", "hvd_easgd.train", "--config", "recipes/demo/digits.yaml",
                       "--run-dir", str(tmp_path / "run"), "--set", "optimizer.lr=1000",
                       "--set", "log.progress=false"], np=2, timeout=240, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "training stopped" in text and "NaN/inf" in text
    assert "lower optimizer.lr" in text.lower()
    assert time.monotonic() - started < 120
