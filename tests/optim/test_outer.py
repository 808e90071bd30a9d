"""Outer optimizers and DiLoCo (issue 12, part 2).

The optimizer's shared 2-worker Horovod Gloo job (tests/hvdrun.py OPT_JOBS) runs every case
(tests/workers/outer_sync.py's item kinds); each is replayed in tests/reference.py's
OuterReference (written from the rule, single process). Bad input and the trainer's wiring are
checked in this process (a one-worker Horovod).
"""

from __future__ import annotations

import pytest
import torch

from tests.hvdrun import OPT_JOBS
from tests.reference import (
    Case, OUTER_FACTORIES, OuterReference, Reference, assert_rank_matches, max_abs_diff,
    outer_reference_result, reference_result,
)

TOL = 1e-6
NP = 2

MATCH_CASES = [
    Case(name="diloco-adamw", method="diloco", opt="adamw", beta=None, tau=3, steps=10),
    Case(name="diloco-async", method="diloco", mode="async", opt="sgd", beta=None, tau=2,
         steps=7, seed=1),
    Case(name="diloco-bn-running", method="diloco", opt="nesterov", model="bn", buffers=True,
         beta=None, tau=2, steps=6, center_average="running", seed=2),
    Case(name="easgd-outer-sgd-beta", method="easgd", opt="sgd", seed=3,
         extra={"outer_optimizer": "sgd-beta"}),
    Case(name="eamsgd-outer-adam", method="easgd", opt="nesterov", tau=2, steps=7, seed=4,
         extra={"outer_optimizer": "adam"}),
    Case(name="easgd-async-outer-nesterov", method="easgd", mode="async", opt="sgd", tau=2,
         steps=7, seed=5, extra={"outer_optimizer": "nesterov"}),
]
RESUME = Case(name="resume-diloco", method="diloco", opt="adamw", beta=None, tau=2, steps=9,
              seed=6)
COMMIT = Case(name="commit-diloco", method="diloco", opt="adamw", beta=None, tau=3, steps=12,
              seed=7)


def _items():
    items = [{"kind": "outer_match", "case": c.to_dict()} for c in MATCH_CASES]
    items.append({"kind": "outer_resume", "save_at": 5, "case": RESUME.to_dict()})
    items.append({"kind": "outer_commit", "save_at": 6, "case": COMMIT.to_dict()})
    return items


# these items run in the optimizer's shared 2-worker job (tests/hvdrun.py OPT_JOBS), whose
# worker (tests/workers/opt_async.py) runs tests/workers/outer_sync.py's item kinds
OPT_JOBS[NP].add(_items())


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    results = OPT_JOBS[NP].results(tmp_path_factory)
    by_name = {}
    for item in _items():
        name = item["case"]["name"]
        for r, res in enumerate(results[name]):
            assert res["ok"], f"{name}: rank {r} raised:\n{res['error']['traceback']}"
        by_name[name] = results[name]
    return by_name


# ------------------------------------------------------------------ the reference itself


def test_reference_diloco_first_round_by_hand():
    """One DiLoCo round with plain SGD outer (lr 1, no momentum) is model averaging, and the
    Nesterov outer step from a zero momentum is c - lr * (1 + m) * g."""
    OUTER_FACTORIES["_sgd1"] = lambda ps: torch.optim.SGD(ps, lr=1.0)
    try:
        case = Case(method="diloco", beta=None, tau=2, steps=2, extra={"outer_optimizer": "_sgd1"})
        avg = Reference(Case(method="average", tau=2, steps=2), 2).run().result()
        got = OuterReference(case, 2).run().result()
        assert max_abs_diff(got["center"], avg["center"]) < 1e-7
        assert got["params"][0] == got["params"][1] == got["center"]
    finally:
        del OUTER_FACTORIES["_sgd1"]
    plain = Reference(Case(method="average", tau=2, steps=2), 2)
    c0 = [float(v) for t in plain.center for v in t.reshape(-1)]
    mean = plain.run().result()["center"]
    nes = OuterReference(Case(method="diloco", beta=None, tau=2, steps=2), 2).run().result()
    want = [c - 0.7 * 1.9 * (c - m) for c, m in zip(c0, mean)]
    assert max_abs_diff(nes["center"], want) < 1e-6


# ------------------------------------------------------------------ real workers


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", MATCH_CASES, ids=[c.name for c in MATCH_CASES])
def test_matches_reference(job, case):
    ranks = job[case.name]
    ref = outer_reference_result(case, NP)
    for r, res in enumerate(ranks):
        assert_rank_matches(case, NP, r, res, ref, TOL)
        if case.extra.get("outer_optimizer") != "sgd-beta":  # plain SGD keeps no state
            assert res["outer_state_keys"], "the outer optimizer's state is in state_dict()"
    for res in ranks[1:]:
        assert res["center"] == ranks[0]["center"], "center replicas are not bit-identical"
    if case.method == "diloco" and case.mode == "sync" and case.steps % case.tau == 0:
        for res in ranks:  # every worker restarted from the center (x + (c' - c) - d)
            assert max_abs_diff(res["params"], res["center"]) < TOL


def test_easgd_with_sgd_beta_outer_is_easgd(job):
    """SGD(lr=beta) as the outer optimizer is EASGD's own rule (up to rounding)."""
    case = next(c for c in MATCH_CASES if c.name == "easgd-outer-sgd-beta")
    plain = reference_result(Case.from_dict({**case.to_dict(), "extra": {}}), NP)
    for res in job[case.name]:
        assert max_abs_diff(res["center"], plain["center"]) < TOL


def test_state_dict_carries_outer_momentum(job):
    full, resumed = job[RESUME.name][0]["full"], job[RESUME.name][0]["resumed"]
    for r, res in enumerate(job[RESUME.name]):
        assert res["resumed"]["center"] == res["full"]["center"], f"rank {r}"
        assert res["resumed"]["params"] == res["full"]["params"], f"rank {r}"
    assert full["counters"] == resumed["counters"]


def test_elastic_commit_restores_outer_state(job):
    for r, res in enumerate(job[COMMIT.name]):
        assert res["after_restore"] == {"steps": 6, "rounds": 2}
        assert res["second"]["center"] == res["first"]["center"], f"rank {r}"
        assert res["second"]["params"] == res["first"]["params"], f"rank {r}"


# ------------------------------------------------------------------ bad input, in process


@pytest.fixture(scope="module")
def hvd1():
    import horovod.torch as hvd

    hvd.init()
    return hvd


def _wrap(hvd1, **kw):
    import hvd_easgd

    model = torch.nn.Linear(3, 2)
    return hvd_easgd.ElasticOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      model.named_parameters(), **kw), model


@pytest.mark.parametrize("kw, exc, match", [
    (dict(method="diloco", alpha=0.1), ValueError, "Drop alpha="),
    (dict(method="diloco", beta=0.5), ValueError, "Drop beta="),
    (dict(method="downpour", outer_optimizer=OUTER_FACTORIES["nesterov"]), ValueError,
     "Use method='diloco'"),
    (dict(outer_optimizer="sgd"), TypeError, "factory"),
    (dict(outer_optimizer=lambda ps: "not an optimizer"), TypeError, "not a torch.optim"),
], ids=["diloco-alpha", "diloco-beta", "downpour-outer", "not-callable", "not-optimizer"])
def test_bad_input(hvd1, kw, exc, match):
    with pytest.raises(exc, match=match):
        _wrap(hvd1, **kw)


def test_outer_over_wrong_tensors(hvd1):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="outer_optimizer=lambda params"):
        _wrap(hvd1, outer_optimizer=torch.optim.SGD(model.parameters(), lr=0.7))
    with pytest.raises(ValueError, match="ignore its argument"):
        _wrap(hvd1, outer_optimizer=lambda ps: torch.optim.SGD(model.parameters(), lr=0.7))


def test_diloco_defaults_and_state(hvd1):
    opt, model = _wrap(hvd1, method="diloco", tau=2)
    outer = opt.outer_optimizer
    assert isinstance(outer, torch.optim.SGD)
    group = outer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.7, 0.9, True)
    assert [tuple(p.shape) for p in group["params"]] == [(2, 3), (2,)]
    assert "SGD(" in opt.settings()["outer_optimizer"]
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    sd = opt.state_dict()
    assert set(sd["easgd"]["outer"]["state"]) == {0, 1}
    opt.close()
    plain, _ = _wrap(hvd1)
    assert plain.outer_optimizer is None and "outer" not in plain.state_dict()["easgd"]
    plain.close()


def test_trainer_builds_diloco(hvd1):
    from hvd_easgd.train import factory as T
    from hvd_easgd.train.config import load_config
    from hvd_easgd.train.models import build_model

    cfg = load_config("recipes/demo/digits_diloco.yaml")
    model = build_model("digits_net", 10, in_channels=1)
    opt, kind = T.create_optimizer(cfg, model, 0)
    assert kind == "elastic" and opt.method == "diloco"
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    group = opt.outer_optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (cfg.optimizer.outer_lr, cfg.optimizer.outer_momentum)
    opt.close()
