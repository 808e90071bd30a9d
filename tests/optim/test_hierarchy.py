"""Hierarchical EASGD over Horovod process sets, and EASGD among a set (issue 12, part 1).

One real job: 4 Gloo processes on two "hosts" (`-H localhost:2,127.0.0.1:2`: Horovod treats the
two names as two hosts), tests/workers/hier_run.py. Every case is replayed from scratch in
tests/reference.py (HierReference: each group one synchronous-SGD model fed by its members'
batches, EASGD among the groups with alpha = beta / groups).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hvdrun import (
    HOROVODRUN, REPO, START_TIMEOUT, WORKERS, read_rank_results, worker_env,
)
from tests.reference import (
    Case, HierOuterReference, HierReference, Reference, max_abs_diff,
)

TOL = 1e-6
NP = 4
HOSTS = "localhost:2,127.0.0.1:2"
BY_HOST = [[0, 1], [2, 3]]
MATCH_CASES = [
    Case(name="host-easgd", tau=3, steps=10, extra={"hierarchy": "host"}),
    Case(name="explicit-eamsgd-async", opt="nesterov", mode="async", tau=2, steps=7, seed=1,
         extra={"hierarchy": [[0, 2], [1, 3]]}),
    Case(name="host-diloco", method="diloco", opt="adamw", beta=None, tau=3, steps=9, seed=2,
         extra={"hierarchy": "host"}),
    Case(name="flat-easgd", tau=3, steps=10, seed=3),  # the same job without hierarchy
]
GROUPS = {"host-easgd": BY_HOST, "explicit-eamsgd-async": [[0, 2], [1, 3]],
          "host-diloco": BY_HOST}
ERRORS = [
    (Case(name="unequal", extra={"hierarchy": [[0, 1, 2], [3]]}), "differ in size"),
    (Case(name="left-out", extra={"hierarchy": [[0], [1]]}), "leaves out rank(s) [2, 3]"),
    (Case(name="bad-name", extra={"hierarchy": "rack"}), "'host' or explicit"),
    (Case(name="float-rank", extra={"hierarchy": [[0.9, 1.2], [2, 3]]}), "rank 0.9 (a float)"),
    (Case(name="out-of-range", extra={"hierarchy": [[0, 1], [2, 3], [4, 5]]}),
     "names rank(s) [4, 5], but the job has 4 workers, ranks 0..3"),
]
SET_CASE = Case(name="process-set", tau=2, steps=6, seed=4)
SET_RANKS = [0, 1, 2]
SET_NAN_CASE = Case(name="process-set-nan", tau=2, steps=6, seed=4)


def _items():
    items = [{"kind": "match", "case": c.to_dict()} for c in MATCH_CASES]
    items += [{"kind": "error", "case": c.to_dict()} for c, _ in ERRORS]
    items.append({"kind": "process_set", "case": SET_CASE.to_dict(), "ranks": SET_RANKS})
    items.append({"kind": "process_set", "case": SET_NAN_CASE.to_dict(), "ranks": SET_RANKS,
                  "nan": {"rank": 2, "step": 4}})
    return items


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("hier")
    cmd = [HOROVODRUN, "-np", str(NP), "-H", HOSTS, "--gloo", "--start-timeout",
           str(START_TIMEOUT), sys.executable, str(WORKERS / "hier_run.py"), "--out", str(out),
           "--cases", json.dumps(_items())]
    proc = subprocess.run(cmd, cwd=str(REPO), env=worker_env({"HOROVOD_GLOO_TIMEOUT_SECONDS": "60"}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"horovodrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = read_rank_results(out, NP)
    by_name = {}
    for i, item in enumerate(_items()):
        ranks = [r["results"][i] for r in results]
        for r, res in enumerate(ranks):
            assert res["ok"], f"{item['case']['name']}: rank {r} raised:\n{res['error']['traceback']}"
        by_name[item["case"]["name"]] = ranks
    return by_name


def _reference(case: Case, groups):
    cls = HierOuterReference if case.method == "diloco" else HierReference
    return cls(case, groups).run()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_matches_two_level_reference(job, name):
    case = next(c for c in MATCH_CASES if c.name == name)
    ranks, groups = job[name], GROUPS[name]
    ref = _reference(case, groups)
    want = ref.result()
    for r, res in enumerate(ranks):
        assert max_abs_diff(res["center"], want["center"]) < TOL, f"rank {r}: center"
        assert max_abs_diff(res["params"], ref.rank_params(r)) < TOL, f"rank {r}: params"
        assert res["counters"] == {"steps": want["steps"], "rounds": want["rounds"]}
        if case.method == "easgd":
            assert res["alpha"] == pytest.approx(0.9 / len(groups))  # beta / groups
    for r, res in enumerate(ranks[1:], 1):
        assert res["center"] == ranks[0]["center"], f"rank {r}: center replicas differ"
    for group in groups:  # the workers of a group are one synchronous-SGD worker
        first = ranks[group[0]]["params"]
        for r in group[1:]:
            assert ranks[r]["params"] == first, f"rank {r} differs from rank {group[0]} (bitwise)"


def test_flat_job_matches_flat_reference(job):
    case = next(c for c in MATCH_CASES if c.name == "flat-easgd")
    want = Reference(case, NP).run().result()
    for r, res in enumerate(job[case.name]):
        assert max_abs_diff(res["params"], want["params"][r]) < TOL
        assert max_abs_diff(res["center"], want["center"]) < TOL


def _metered(res, groups):
    """(bytes, allreduces) this worker handed to Horovod over process sets that span several
    groups, and the bytes over sets inside one group (metered at Horovod, by process set)."""
    def spans(ranks):
        return sum(1 for g in groups if set(ranks) & set(g)) > 1

    cross = [c for c in res["collectives"] if spans(c[1])]
    inside = [c for c in res["collectives"] if not spans(c[1])]
    return (sum(c[2] for c in cross), sum(1 for c in cross if c[0] == "allreduce"),
            sum(c[2] for c in inside))


def test_bytes_across_groups(job):
    """A round puts one model's bytes per node on the inter-group links, not n of them."""
    flat, hier = job["flat-easgd"], job["host-easgd"]
    case = next(c for c in MATCH_CASES if c.name == "host-easgd")
    rounds, size = case.steps // case.tau, flat[0]["param_bytes"]
    for group in BY_HOST:
        node_flat = sum(_metered(flat[r], BY_HOST)[0] for r in group)
        node_hier = sum(_metered(hier[r], BY_HOST)[0] for r in group)
        assert node_flat == len(group) * rounds * size
        assert node_hier == rounds * size  # each local rank sent its 1/n slice
    for r, res in enumerate(hier):
        cross, cross_allreduces, inside = _metered(res, BY_HOST)
        assert cross_allreduces == rounds, (r, res["collectives"])
        # inside the group: a gradient allreduce every step and an allgather of the slices
        # every round (this worker hands in its own slice)
        assert inside == case.steps * size + cross, (r, res["collectives"])


def test_process_set_members_run_easgd_among_themselves(job):
    ranks = job["process-set"]
    want = Reference(SET_CASE, len(SET_RANKS)).run().result()
    for r in SET_RANKS:
        assert ranks[r]["member"], ranks[r]
        assert max_abs_diff(ranks[r]["params"], want["params"][r]) < TOL
        assert ranks[r]["center"] == ranks[0]["center"]
    outsider = ranks[3]
    assert not outsider["member"]
    assert "does not contain this worker (rank 3)" in outsider["message"]
    assert "ps.ranks" in outsider["message"]  # names the fix


def test_process_set_names_the_nonfinite_member(job):
    # Only the set's members take part in finding who sent NaN (rank 3 never joins: no hang),
    # and they name the member by its global rank.
    ranks = job["process-set-nan"]
    for r in SET_RANKS:
        assert ranks[r]["member"] and ranks[r]["skipped_rounds"] == 1, ranks[r]
        assert ranks[r]["center"] == ranks[0]["center"]
    assert any("rank(s) 2" in w for w in ranks[0]["warnings"]), ranks[0]["warnings"]
    assert any("rank(s) 2" in w for w in ranks[2]["warnings"]), ranks[2]["warnings"]
    assert not ranks[3]["member"]


@pytest.mark.parametrize("case, message", ERRORS, ids=[c.name for c, _ in ERRORS])
def test_bad_hierarchy(job, case, message):
    for r, res in enumerate(job[case.name]):
        assert res["error_type"] == "ValueError", f"rank {r}: {res}"
        assert message in res["message"], res["message"]


def test_process_sets_for_init():
    """hvd.init(process_sets=...) input for a hierarchy: the groups and the cross sets."""
    from hvd_easgd.optim.hierarchy import bounds, cross_groups, process_sets

    assert cross_groups([[0, 1], [2, 3]]) == [[0, 2], [1, 3]]
    assert [ps.ranks for ps in process_sets([[0, 1], [2, 3]])] == [[0, 1], [2, 3], [0, 2], [1, 3]]
    assert [ps.ranks for ps in process_sets([[0], [1]])] == []  # one-worker groups: the world
    parts = [bounds(10, 3, j) for j in range(3)]
    assert [(s.start, s.stop) for s in parts] == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.timeout(300)
def test_trainer_runs_the_hierarchy_recipe_on_two_hosts(tmp_path):
    """hvd-easgd-train with recipes/demo/digits_hierarchy.yaml over two "hosts": the hosts do
    EASGD rounds (cross-host bytes are logged), nothing falls back to flat EASGD."""
    from hvd_easgd.train.metrics import read_metrics
    from hvd_easgd.train.models import build_model

    run_dir = tmp_path / "run"
    trainer = str(REPO / ".venv" / "bin" / "hvd-easgd-train")
    if not Path(trainer).exists():
        trainer = str(Path(sys.executable).with_name("hvd-easgd-train"))
    cmd = [HOROVODRUN, "-np", "4", "-H", HOSTS, "--gloo", "--start-timeout", str(START_TIMEOUT),
           trainer, "--config", "recipes/demo/digits_hierarchy.yaml", "--run-dir", str(run_dir),
           "--set", "train.max_steps=48", "--quiet"]
    proc = subprocess.run(cmd, cwd=str(REPO), env=worker_env(), capture_output=True, text=True,
                          timeout=280)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "running flat EASGD" not in output
    logged = [r for r in read_metrics(run_dir) if r.get("comm/cross_group_bytes")]
    assert logged, "no cross-host bytes were logged"
    last = logged[-1]
    rounds = last["step"] // 16
    model = build_model("digits_net", 10, in_channels=1)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Each worker sends half of every round across hosts (flat EASGD would send all of it).
    assert rounds >= 1 and 2 * last["comm/cross_group_bytes"] == rounds * param_bytes, last
    assert (run_dir / "center.pt").exists()


def test_hierarchy_under_horovod_elastic_says_what_to_use(monkeypatch):
    """Under an elastic launch, hierarchy= fails at construction, before any collective, and
    names the two ways out."""
    import horovod.torch as hvd
    import torch

    import hvd_easgd

    hvd.init()
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    model = torch.nn.Linear(3, 2)
    for kw in ({"hierarchy": "host"}, {"hierarchy": [[0]]}):
        with pytest.raises(ValueError, match="Use flat EASGD for elastic jobs.*--min-np"):
            hvd_easgd.ElasticOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(), **kw)


@pytest.mark.parametrize("groups, message", [
    ([[0.9, 1.2], [2, 3]], "has rank 0.9 (a float): a rank is a worker's hvd.rank(), an int"),
    ([[-0.5, 1], [2, 3]], "has rank -0.5 (a float)"),
    ([["0", "1"], [2, 3]], "has rank '0' (a str)"),
    ([[True, False], [2, 3]], "has rank True (a bool)"),
    ([[0, 1], [-1, 2]], "has rank -1: ranks are the workers' hvd.rank(), 0 and up"),
    ([[0, 1], [1, 2]], "names rank(s) [1] more than once"),
    ([[0, 0], [1, 2]], "names rank(s) [0] more than once"),
    ([[0, 1], 2], "a list of lists of ranks"),
    ([[0, 1], [2, 3], [4, 5]], "names rank(s) [4, 5], but the job has 4 workers, ranks 0..3: use "
                               "only those ranks, or launch more workers"),
], ids=["float", "negative-float", "str", "bool", "negative", "overlap", "twice", "not-a-group",
        "out-of-range"])
def test_check_groups_names_the_bad_rank(groups, message):
    """Only ints are ranks (nothing is rounded: 0.9 is not rank 0), and each mistake gets its own
    message; out of range is not "at most once"."""
    from hvd_easgd.optim.hierarchy import check_groups

    with pytest.raises(ValueError) as error:
        check_groups(groups, 4, 0, every_rank=True)
    assert message in str(error.value)
    assert "at most once" not in str(error.value)


def test_check_group_shape_needs_no_world_size():
    """The checks hvd_easgd.train.config runs before launch: lists of ints (any int type) come back
    sorted; the world size and this worker's rank are check_groups' alone."""
    import numpy as np

    from hvd_easgd.optim.hierarchy import check_group_shape, check_groups

    assert check_group_shape([(1, 0), range(2, 4)]) == [[0, 1], [2, 3]]
    assert check_group_shape([[np.int64(5), 4], [7, 6]]) == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match=r"ranks 0\.\.7"):
        check_groups([[4, 5], [7, 8]], 8, 4, every_rank=False)
    assert check_groups([[4, 5], [7, 6]], 8, 4, every_rank=False) == [[4, 5], [6, 7]]
