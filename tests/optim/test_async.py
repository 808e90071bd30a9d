"""The elastic optimizer's asynchronous mode (issue 4), with real Horovod Gloo workers.

Async rounds are applied tau steps late (round k's correction lands at round k+1, or at
`synchronize()`); tests/reference.py simulates exactly that, and the workers must match it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.hvdrun import OPT_JOBS, WORKERS, horovodrun
from tests.reference import (
    Case, Reference, assert_rank_matches, max_abs_diff, reference_result,
)

TOL = 1e-6

MATCH_CASES = [
    Case(name="async-easgd-sgd-wd", mode="async", method="easgd", opt="sgd"),
    Case(name="async-eamsgd-nesterov", mode="async", method="easgd", opt="nesterov", seed=1),
    Case(name="async-easgd-tau1", mode="async", method="easgd", opt="nesterov", tau=1, steps=5,
         seed=2),
    Case(name="async-easgd-running", mode="async", method="easgd", opt="sgd", tau=2, steps=9,
         center_average="running", seed=3),
    # the pulling methods, delayed the same way (see tests/reference.py for the rule)
    Case(name="async-downpour", mode="async", method="downpour", opt="sgd", seed=4),
    Case(name="async-average", mode="async", method="average", opt="nesterov", seed=5),
    Case(name="async-mdownpour", mode="async", method="mdownpour", master_momentum=0.5,
         opt="sgd", seed=6),
]
EASGD_CASES = [c for c in MATCH_CASES if c.method == "easgd"]
PULL_CASES = [c for c in MATCH_CASES if c.method != "easgd"]

SETTLE = [
    {"kind": "settle", "settle_after": 6,
     "case": Case(name="settle-average", mode="async", method="average", tau=2, steps=16,
                  seed=7).to_dict()},
    {"kind": "settle", "settle_after": 6,
     "case": Case(name="settle-downpour", mode="async", method="downpour", tau=2, steps=16,
                  seed=8).to_dict()},
]
OVERLAP = [
    {"kind": "overlap", "hold": 4, "delay": 0.3,
     "case": Case(name=f"overlap-{mode}", mode=mode, tau=4, steps=12, seed=10).to_dict()}
    for mode in ("async", "sync")
]
BOOM = [
    {"kind": "boom", "fail_round": 2,
     "case": Case(name=f"boom-{mode}", mode=mode, tau=2, steps=10).to_dict()}
    for mode in ("async", "sync")
] + [
    # rank 1 only: round 2 (step 4) fails there; both ranks stop after step 5 and synchronize
    {"kind": "boom", "fail_round": 2, "fail_ranks": [1],
     "case": Case(name="boom-async-rank1", mode="async", tau=2, steps=5).to_dict()},
]
RESUME = [
    {"kind": "resume", "save_at": 7,
     "case": Case(name="async-resume-in-flight", mode="async", opt="nesterov", seed=9).to_dict()},
]
CLOSE = [{"kind": "close", "case": Case(name="close", mode="async", tau=2, steps=5).to_dict()}]
COMMIT = [
    {"kind": "commit", "commit_at": 5, "detour_to": 9,
     "case": Case(name=f"commit-{mode}", mode=mode, opt="nesterov", model="bn", buffers=True,
                  tau=2, steps=12, seed=11).to_dict()}
    for mode in ("sync", "async")
]
NOCLOSE = Case(name="noclose", mode="async", tau=2, steps=5)  # round 2 (step 4) in flight at exit
WAIT_CPU = [{"kind": "wait_cpu", "late": 1.0,
             "case": Case(name=f"wait-{mode}", mode=mode, tau=1, steps=3).to_dict()}
            for mode in ("sync", "async")]


def _items(np_):
    items = [{"kind": "match", "case": c.to_dict()} for c in MATCH_CASES] + SETTLE + RESUME + COMMIT
    if np_ == 2:
        items += OVERLAP + BOOM + CLOSE + WAIT_CPU
    return items


# One job per worker count, shared with tests/optim/test_outer.py (tests/hvdrun.py OPT_JOBS);
# the 2-worker job ends with an async optimizer left unclosed, a round in flight.
for _np in (2, 3):
    OPT_JOBS[_np].add(_items(_np))
OPT_JOBS[2].add([{"kind": "noclose", "case": NOCLOSE.to_dict()}], last=True)


def _run_job(np_, tmp_path_factory):
    by_name = dict(OPT_JOBS[np_].results(tmp_path_factory))
    if np_ == 2:  # written by the workers after their exit handlers ran
        by_name["noclose-at-exit"] = [
            json.loads(p.read_text()) if p.exists() else None
            for p in (OPT_JOBS[np_].out_dir / f"noclose{r}.json" for r in range(np_))]
    return np_, by_name


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def async_job(request, tmp_path_factory):
    return _run_job(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def async_np2(tmp_path_factory):
    return _run_job(2, tmp_path_factory)


def _ok(ranks, name):
    for r, res in enumerate(ranks):
        assert res["ok"], f"{name}: rank {r} raised:\n{res['error']['traceback']}"
    return ranks


def _check_match(np_, ranks, case):
    ref = reference_result(case, np_)
    for r, res in enumerate(ranks):
        assert_rank_matches(case, np_, r, res, ref, TOL)
        # counted at Horovod: one allreduce per round in all (on the background thread)
        assert res["total_allreduces"] == ref["rounds"], (r, res["total_allreduces"])
        assert res["center"] == ranks[0]["center"], f"center of rank {r} != rank 0 (bitwise)"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", EASGD_CASES, ids=[c.name for c in EASGD_CASES])
def test_async_easgd_matches_delayed_reference(async_job, case):
    np_, by_name = async_job
    _check_match(np_, _ok(by_name[case.name], case.name), case)


@pytest.mark.timeout(300)
def test_async_is_not_sync(async_job):
    """The delay is real: the async reference differs from the sync one, so the match above
    could not pass with a wrapper that applies rounds at once."""
    np_, by_name = async_job
    case = EASGD_CASES[0]
    sync = reference_result(Case.from_dict({**case.to_dict(), "mode": "sync"}), np_)
    got = by_name[case.name][0]
    assert max_abs_diff(got["center"], sync["center"]) > 1e-4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", PULL_CASES, ids=[c.name for c in PULL_CASES])
def test_async_pulling_methods_match_delayed_reference(async_job, case):
    np_, by_name = async_job
    _check_match(np_, _ok(by_name[case.name], case.name), case)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("item", SETTLE, ids=[i["case"]["name"] for i in SETTLE])
def test_async_pulling_methods_settle_on_the_center(async_job, item):
    """With the learning rate set to 0, a worker makes no progress: a late pull must not keep
    re-applying an update the worker already gave up (no oscillation around the center)."""
    np_, by_name = async_job
    name = item["case"]["name"]
    for r, res in enumerate(_ok(by_name[name], name)):
        d = max_abs_diff(res["params"], res["center"])
        assert d < TOL, f"{name}: rank {r} ends {d} away from the center; trace {res['trace']}"


@pytest.mark.timeout(300)
def test_async_state_dict_keeps_the_round_in_flight(async_job):
    """Saved at step 7 with round 2 (step 6) in flight: state_dict() synchronizes, so the
    resumed run equals an uninterrupted run that synchronized at step 7."""
    np_, by_name = async_job
    item = RESUME[0]
    case = Case.from_dict(item["case"])
    for r, res in enumerate(_ok(by_name[case.name], case.name)):
        assert res["saved_counters"] == res["loaded_counters"] == {"steps": 7, "rounds": 2}
        assert res["resumed"]["params"] == res["full"]["params"], f"rank {r}"
        assert res["resumed"]["center"] == res["full"]["center"], f"rank {r}"
        assert res["resumed"]["counters"] == res["full"]["counters"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("item", COMMIT, ids=[i["case"]["name"] for i in COMMIT])
def test_commit_restore_roll_everything_back_together(async_job, item):
    """Horovod Elastic's commit and restore through hvd.elastic.TorchState on every worker of a
    2- and a 3-worker job (tests/workers/opt_commit.py): what restore() brings back is what
    commit() saw, and a detour of rounds with the peers (async: one in flight at the restore)
    leaves no trace: the run goes on as if it had restored at once (up to the order in which
    three workers' sums are rounded, which Horovod's fusion may change)."""
    np_, by_name = async_job
    name = item["case"]["name"]
    ranks = _ok(by_name[name], name)
    for r, res in enumerate(ranks):
        detour, direct = res["detour"], res["direct"]
        assert detour["moved"], f"rank {r}: the detour did not move the parameters"
        for key in ("params", "buffers", "momentum", "center", "counters", "epoch"):
            assert detour["restored"][key] == detour["committed"][key], (r, key)  # bit for bit
        assert detour["final"]["counters"] == direct["final"]["counters"], r
        for key in ("params", "buffers", "center"):
            d = max_abs_diff(detour["final"][key], direct["final"][key])
            assert d < TOL, (r, key, d)
        assert detour["final"]["center"] == ranks[0]["detour"]["final"]["center"], r


@pytest.mark.timeout(300)
def test_async_overlaps_communication(async_np2):
    """Each round's exchange is held on the wire until training has started `hold` (= tau)
    more steps: in async mode training takes them (the round lands at the next round step,
    having cost training nothing); in sync mode it cannot (the wait blocks the training thread,
    and the hold gives up after `delay`), which shows the measure sees the difference."""
    np_, by_name = async_np2
    for item in OVERLAP:
        case = Case.from_dict(item["case"])
        ranks = _ok(by_name[case.name], case.name)
        ref = reference_result(case, np_)  # a slow exchange changes nothing in the result
        for r, res in enumerate(ranks):
            assert_rank_matches(case, np_, r, res, ref, TOL)
            rounds = res["rounds"]
            if case.mode == "async":
                assert [x["handed_off_at"] for x in rounds] == [4, 8, 12], rounds
                # rounds 1 and 2: all of the next tau steps ran while they were on the wire;
                # round 3 is collected by the final synchronize(), with no step left to take
                assert [x["steps_on_wire"] for x in rounds] == [case.tau, case.tau, 0], rounds
                assert not any(x["training_thread"] for x in rounds), rounds
            else:
                # sync EASGD starts a round when the step before its round step ends, so the
                # round step's forward and backward run behind it, and nothing more: the round
                # step itself waits on the training thread
                assert [x["handed_off_at"] for x in rounds] == [3, 7, 11], rounds
                assert [x["steps_on_wire"] for x in rounds] == [1, 1, 1], rounds
                assert all(x["training_thread"] for x in rounds), rounds


@pytest.mark.timeout(300)
def test_async_error_reraised_on_training_thread(async_np2):
    np_, by_name = async_np2
    tau = 2
    for r, res in enumerate(_ok(by_name["boom-async"], "boom-async")):
        # round 2 is handed off at step 4 and fails on the thread; the training thread sees it
        # at the next step that checks (5) or at round 3 (step 6) at the latest
        assert res["raised_at"] in (2 * tau + 1, 3 * tau), res
        assert res["first"]["type"] == "RuntimeError" and res["first"]["message"] == "boom"
        assert "boom" in res["first"]["traceback"]
        # the optimizer stays failed, and says so
        assert res["later_step"] is not None and res["later_sync"] is not None
        assert "earlier EASGD round failed" in res["later_step"]["message"]
        assert res["close_ok"], res.get("close_error")
    for r, res in enumerate(_ok(by_name["boom-sync"], "boom-sync")):
        assert res["raised_at"] == 2 * tau, res
        assert res["first"]["message"] == "boom"


@pytest.mark.timeout(300)
def test_async_error_on_one_rank_only(async_np2):
    """Round 2 fails on rank 1 only: rank 1's training thread gets the error (at step 5 or
    at synchronize()), rank 0's run is untouched."""
    np_, by_name = async_np2
    healthy, failed = _ok(by_name["boom-async-rank1"], "boom-async-rank1")
    assert failed["raised_at"] in (5, "synchronize"), failed
    assert failed["first"]["type"] == "RuntimeError" and failed["first"]["message"] == "boom"
    assert failed["later_step"] is not None and failed["close_ok"]
    assert healthy["raised_at"] is None and healthy["first"] is None, healthy
    assert healthy["counters"] == {"steps": 5, "rounds": 2} and healthy["close_ok"]


@pytest.mark.timeout(300)
def test_async_close_and_context_manager(async_np2):
    np_, by_name = async_np2
    case = Case.from_dict(CLOSE[0]["case"])
    ref = reference_result(case, np_)  # leaving the `with` block finishes the last round
    for r, res in enumerate(_ok(by_name["close"], "close")):
        assert res["enter_returns_self"]
        assert res["close_twice_ok"], res.get("close_error")
        assert res["step_after_close"] is not None  # a closed optimizer refuses to step
        assert max_abs_diff(res["after_with"]["center"], ref["center"]) < TOL


@pytest.mark.timeout(300)
def test_script_without_close_exits_cleanly(async_np2):
    """A round is still in flight when the 2-worker job's script ends without close(): atexit
    lands it (every worker then holds the synchronized reference's model and center), and the
    job exits 0 (run_workers fails every async_np2 test otherwise)."""
    np_, by_name = async_np2
    ref = reference_result(NOCLOSE, np_)  # synchronized at the end: the last round applied
    unlanded = Reference(NOCLOSE, np_).run(synchronize=False).result()
    assert max_abs_diff(ref["center"], unlanded["center"]) > 1e-4  # the check can tell
    for r, res in enumerate(by_name["noclose-at-exit"]):
        assert res is not None, f"rank {r}: nothing written after the exit handlers ran"
        assert max_abs_diff(res["center"], ref["center"]) < TOL, f"rank {r}: center"
        assert max_abs_diff(res["params"], ref["params"][r]) < TOL, f"rank {r}: params"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_worker_raising_fails_the_job_in_bounded_time(tmp_path, mode):
    # bounded: the subprocess timeout (150 s) fails the test if the job hangs
    proc = horovodrun([sys.executable, str(WORKERS / "opt_raise.py"), "--out", str(tmp_path),
                       "--what", mode], np=2, timeout=150, check=False,
                      env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "20"})
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "worker 1 failed on purpose" in proc.stdout + proc.stderr
    assert not (tmp_path / "rank0.json").exists()  # rank 0 did not carry on to the end alone


@pytest.mark.timeout(300)
def test_waiting_for_a_round_does_not_spin(async_np2):
    """Rank 1 sleeps 1 s before each of its 3 steps (tau = 1): rank 0 waits about 2 s (sync:
    the round of step 2 was started when rank 1's step 1 ended, before its sleep) or 3 s
    (async) and must not burn a core doing it (Horovod's own synchronize busy-yields;
    hvd_easgd polls and sleeps). Run in the 2-worker job."""
    np_, by_name = async_np2
    for mode in ("sync", "async"):
        waited = _ok(by_name[f"wait-{mode}"], f"wait-{mode}")[0]
        late = 1.5 if mode == "sync" else 2.5
        assert waited["wall"] > late, (mode, waited)  # it really waited for the late peer
        assert waited["cpu"] < 0.35 * waited["wall"], (mode, waited)
