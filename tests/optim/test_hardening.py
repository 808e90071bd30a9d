"""Hardening (issue 15): behaviour that had no test, each test able to fail.

One `horovodrun -np 2` job (tests/workers/hardening_np2.py) runs every multi-worker scenario:
BatchNorm buffers and fp16 compression in async mode and for the pulling methods (against
tests/reference.py), alpha/beta with 2 workers, a model with several parameter groups, a frozen
parameter, bf16/fp16 parameters and a closure (EASGD replayed by hand from what each step
recorded), the trainer resuming a 1-worker run on 2 workers, and, last, a peer that exits in
the middle of an async run. Pure argument checks and the trainer's resume errors run in this
process (`hvd.init()` gives a one-worker Horovod).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.hvdrun import REPO, WORKERS, horovodrun
from tests.reference import (
    Case, assert_rank_matches, build_model, max_abs_diff, reference_result,
)

TOL = 1e-6
DEMO = REPO / "recipes" / "demo" / "digits.yaml"
TRAIN = ["train.max_steps=8", "checkpoint.every=4", "checkpoint.keep=3", "train.eval_every=4",
         "log.every=4", "log.progress=false", "log.tensorboard=false", "launch.np=null"]

# -------------------------------------------------------------------------------------------
# The scenarios of the one 2-worker job
# -------------------------------------------------------------------------------------------

SYNC_BN = [
    Case(name="downpour-bn", method="downpour", model="bn", buffers=True, tau=2, steps=6, seed=23),
    Case(name="mdownpour-bn", method="mdownpour", master_momentum=0.5, model="bn", buffers=True,
         tau=2, steps=6, seed=24),
    Case(name="average-bn", method="average", opt="nesterov", model="bn", buffers=True, tau=2,
         steps=6, seed=25),
]
ASYNC_BN = [
    Case(name="async-easgd-bn", mode="async", model="bn", buffers=True, tau=2, steps=6, seed=21),
    Case(name="async-average-bn", mode="async", method="average", model="bn", buffers=True,
         tau=2, steps=6, seed=22),
]
FP16 = [
    Case(name="async-easgd-fp16", mode="async", compression="fp16", tau=2, steps=7, seed=31),
    Case(name="downpour-fp16", method="downpour", compression="fp16", tau=2, steps=7, seed=32),
    Case(name="mdownpour-fp16", method="mdownpour", master_momentum=0.5, compression="fp16",
         tau=2, steps=7, seed=33),
    Case(name="async-average-fp16", mode="async", method="average", compression="fp16", tau=2,
         steps=7, seed=34),
]
MIXED = {"kind": "mixed", "name": "mixed", "tau": 2, "steps": 6, "beta": 0.8, "lrs": [0.1, 0.5]}
COEFFS = {"kind": "coeffs", "name": "coeffs"}
REGROW_MORE = 16  # the 1-worker checkpoint is at step 8; tau is 4: two 2-worker rounds


def _items(regrow_a: Path, regrow_b: Path):
    items = [{"kind": "match", "name": c.name, "case": c.to_dict()}
             for c in SYNC_BN + ASYNC_BN + FP16]
    items += [COEFFS, MIXED]
    items.append({"kind": "regrow", "name": "regrow", "recipe": str(DEMO), "overrides": TRAIN,
                  "dir_a": str(regrow_a), "extra_a": [], "dir_b": str(regrow_b),
                  "extra_b": [f"train.max_steps={REGROW_MORE}"]})
    return items


@pytest.fixture(scope="module")
def hvd1():
    import horovod.torch as hvd

    hvd.init()
    assert hvd.size() == 1
    return hvd


def _quiet_run(cfg, **kwargs):
    from hvd_easgd.train.cli import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(cfg, **kwargs)


@pytest.fixture(scope="module")
def one_worker_run(hvd1, tmp_path_factory):
    """The digits demo on ONE worker (this process), 8 steps, checkpoints at 4 and 8."""
    from hvd_easgd.train import checkpoint as ckpt
    from hvd_easgd.train.config import load_config

    run_dir = tmp_path_factory.mktemp("one_worker") / "run"
    summary = _quiet_run(load_config(DEMO, TRAIN), run_dir=run_dir)
    assert summary["world_size"] == 1 and summary["step"] == 8
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [4, 8]
    return run_dir


@pytest.fixture(scope="module")
def hard_job(one_worker_run, tmp_path_factory):
    """The one 2-worker job. A hang or a crash fails the tests that need what is missing."""
    root = tmp_path_factory.mktemp("hardening")
    dirs = [root / "regrow_a", root / "regrow_b"]
    for d in dirs:
        shutil.copytree(one_worker_run, d)
    items = _items(*dirs)
    out = root / "out"
    out.mkdir()
    cmd = [sys.executable, str(WORKERS / "hardening_np2.py"), "--out", str(out),
           "--cases", json.dumps(items), "--what", "peer_exit"]
    try:
        proc = horovodrun(cmd, np=2, timeout=240, check=False,
                          env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "60"})
        log = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    except subprocess.TimeoutExpired as exc:
        log = f"timed out: {exc}"
    ranks = []
    for r in range(2):
        path = out / f"rank{r}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else None)
    by_name = {}
    for i, item in enumerate(items):
        by_name[item["name"]] = [None if res is None else res["results"][i] for res in ranks]
    return {"ranks": ranks, "by_name": by_name, "log": log, "dirs": dirs,
            "source": one_worker_run}


def _ok(job, name):
    ranks = job["by_name"][name]
    for r, res in enumerate(ranks):
        assert res is not None, f"{name}: rank {r} wrote no result\n{job['log']}"
        assert res["ok"], f"{name}: rank {r} raised:\n{res['error']['traceback']}"
    return ranks


# -------------------------------------------------------------------------------------------
# BatchNorm buffers: sync pulling methods, and async mode
# -------------------------------------------------------------------------------------------


def _mean(vectors):
    return [sum(v) / len(vectors) for v in zip(*vectors)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", SYNC_BN, ids=[c.name for c in SYNC_BN])
def test_pulling_methods_average_buffers(hard_job, case):
    ranks = _ok(hard_job, case.name)
    ref = reference_result(case, 2)
    for r, res in enumerate(ranks):
        assert_rank_matches(case, 2, r, res, ref, TOL)
        d = max_abs_diff(res["buffers"], ref["buffers"][r])
        assert d < TOL, f"{case.name}: buffers of rank {r} differ from the reference by {d}"
    rounds = sorted(ranks[0]["bufs_after"], key=int)
    assert [int(t) for t in rounds] == list(range(case.tau, case.steps + 1, case.tau))
    for t in rounds:
        before = [res["bufs_before"][t] for res in ranks]
        assert max_abs_diff(before[0], before[1]) > 1e-3  # the averaging is not trivial
        for r, res in enumerate(ranks):
            d = max_abs_diff(res["bufs_after"][t], _mean(before))
            assert d < TOL, f"{case.name} step {t}: rank {r} buffers are {d} off the mean"
    for r, res in enumerate(ranks):
        assert res["center_buffers"] == ranks[0]["center_buffers"], f"rank {r} (bitwise)"
        assert max_abs_diff(res["center_buffers"], res["buffers"]) < TOL


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", ASYNC_BN, ids=[c.name for c in ASYNC_BN])
def test_async_averages_buffers_one_round_late(hard_job, case):
    """Round k's buffer average lands at round k+1, on top of what the worker's forward passes
    did since (like a pulling method's parameters): b_i += mean_j s_j - s_i, where s is the
    buffers as they were sent, i.e. right after the previous round landed. A final
    synchronize() leaves every worker on the center's buffers."""
    ranks = _ok(hard_job, case.name)
    ref = reference_result(case, 2)  # parameters and center (the reference's buffers are sync)
    for r, res in enumerate(ranks):
        assert_rank_matches(case, 2, r, res, ref, TOL)
    rounds = sorted((int(t) for t in ranks[0]["bufs_after"]))
    assert rounds == list(range(case.tau, case.steps + 1, case.tau))
    for t in rounds:
        before = [res["bufs_before"][str(t)] for res in ranks]
        assert max_abs_diff(before[0], before[1]) > 1e-3  # the averaging is not trivial
        for r, res in enumerate(ranks):
            got = res["bufs_after"][str(t)]
            if t == case.tau:
                assert got == before[r], "the first round cannot have landed at its own step"
                continue
            sent = [x["bufs_after"][str(t - case.tau)] for x in ranks]
            want = [b + m - s for b, m, s in zip(before[r], _mean(sent), sent[r])]
            d = max_abs_diff(got, want)
            assert d < 1e-5, f"{case.name} step {t}: rank {r} buffers are {d} off"
    last = [res["bufs_after"][str(rounds[-1])] for res in ranks]
    for r, res in enumerate(ranks):
        assert res["center_buffers"] == ranks[0]["center_buffers"], f"rank {r} (bitwise)"
        assert max_abs_diff(res["center_buffers"], _mean(last)) < 1e-5
        d = max_abs_diff(res["buffers"], res["center_buffers"])
        assert d < 1e-5, f"{case.name}: after synchronize() rank {r} is {d} off the center's buffers"


# -------------------------------------------------------------------------------------------
# fp16 compression: async mode and the pulling methods
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", FP16, ids=[c.name for c in FP16])
def test_fp16_compression_async_and_pulling(hard_job, case):
    ranks = _ok(hard_job, case.name)
    ref = reference_result(case, 2)  # the reference does not compress
    numel = sum(p.numel() for p in build_model(case, 0).parameters())
    rounds = case.steps // case.tau
    for r, res in enumerate(ranks):
        # metered at Horovod: one allreduce per round, half the bytes of float32
        assert res["total_allreduces"] == rounds
        assert res["allreduce_bytes"] == rounds * numel * 2, res["allreduce_bytes"]
        assert res["csd_dtypes"] == ["torch.float32"]  # the center itself stays float32
        assert res["center"] == ranks[0]["center"], f"rank {r}: center differs (bitwise)"
        d = max_abs_diff(res["center"], ref["center"])
        assert d < 5e-3, f"{case.name}: rank {r} center {d} from the uncompressed reference"
        assert max_abs_diff(res["params"], ref["params"][r]) < 5e-3
        assert res["counters"] == {"steps": case.steps, "rounds": rounds}
    # the wire really was fp16: not bit-exact with the uncompressed algorithm
    assert max_abs_diff(ranks[0]["center"], ref["center"]) > 0


# -------------------------------------------------------------------------------------------
# alpha = beta / p with 2 workers
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_alpha_is_beta_over_p_with_two_workers(hard_job):
    for r, res in enumerate(_ok(hard_job, "coeffs")):
        assert res["beta"]["alpha"] == pytest.approx(0.8 / 2) and res["beta"]["beta"] == 0.8
        assert res["alpha"]["alpha"] == 0.3 and res["alpha"]["beta"] == pytest.approx(0.3 * 2)
        # alpha = 0.6 is fine with one worker, not with two
        msg = res["too_big"]["raised"]["message"]
        assert "2 workers" in msg and "1.2" in msg, msg


# -------------------------------------------------------------------------------------------
# Several groups, a frozen parameter, bf16/fp16 beside fp32, a closure: EASGD by hand
# -------------------------------------------------------------------------------------------

EPS = {"torch.float32": 1e-6, "torch.float16": 2 ** -10, "torch.bfloat16": 2 ** -7}
GROUP = {"lin.weight": 0, "lin.bias": 0, "frozen": 0, "scale": 1, "shift": 1,
         "head.weight": 1, "head.bias": 1}


def _close(got, want, dtype, what):
    eps = EPS[dtype]
    for g, w in zip(got, want):
        assert abs(g - w) <= 4 * eps * (1 + abs(w)), f"{what}: {g} != {w} ({dtype})"
    assert len(got) == len(want), what


@pytest.mark.timeout(400)
def test_mixed_model_local_steps_use_each_groups_lr(hard_job):
    ranks = _ok(hard_job, "mixed")
    for r, res in enumerate(ranks):
        assert res["lrs"] == MIXED["lrs"]
        for rec in res["trace"]:
            for name, y in rec["y"].items():
                grad, dtype = rec["grad"][name], res["dtypes"][name]
                if grad is None:
                    assert name == "frozen" and rec["x1"][name] == y
                    continue
                lr = MIXED["lrs"][GROUP[name]]
                want = [a - lr * b for a, b in zip(y, grad)]
                _close(rec["x1"][name], want, dtype, f"rank {r} step {rec['t']} {name}")


@pytest.mark.timeout(400)
def test_mixed_model_easgd_rounds_by_hand(hard_job):
    """x_i <- x_i - alpha*(y_i - c); c <- c + alpha*sum_i(y_i - c), alpha = beta/2, per dtype."""
    ranks = _ok(hard_job, "mixed")
    tau, beta = MIXED["tau"], MIXED["beta"]
    alpha = beta / 2
    assert [res["alpha"] for res in ranks] == [pytest.approx(alpha)] * 2
    steps = list(zip(*(res["trace"] for res in ranks)))
    assert len(steps) == MIXED["steps"]
    # rank 0's initial parameters were broadcast (each rank built its own, seeded by rank)
    assert steps[0][0]["y"] == steps[0][1]["y"]
    for recs in steps:
        t = recs[0]["t"]
        assert recs[0]["c1"] == recs[1]["c1"], f"step {t}: centers differ (bitwise)"
        for r, rec in enumerate(recs):
            for name in rec["y"]:
                dtype = ranks[r]["dtypes"][name]
                c0 = rec["c0"][name]
                if t % tau:
                    assert rec["x2"][name] == rec["x1"][name], f"step {t}: no round, yet moved"
                    assert rec["c1"][name] == c0
                    continue
                want_x = [x - alpha * (y - c) for x, y, c in zip(rec["x1"][name], rec["y"][name], c0)]
                _close(rec["x2"][name], want_x, dtype, f"rank {r} step {t} {name}: pull")
                ys = [o["y"][name] for o in recs]
                want_c = [c + alpha * sum(y[k] - c for y in ys) for k, c in enumerate(c0)]
                _close(rec["c1"][name], want_c, dtype, f"rank {r} step {t} {name}: center")
    # the rounds were not trivial: the workers had moved apart
    last = steps[-1]
    assert max_abs_diff(last[0]["y"]["lin.weight"], last[1]["y"]["lin.weight"]) > 1e-3


@pytest.mark.timeout(400)
def test_mixed_model_dtypes_frozen_and_closure(hard_job):
    ranks = _ok(hard_job, "mixed")
    for r, res in enumerate(ranks):
        assert res["dtypes"]["scale"] == "torch.bfloat16"
        assert res["dtypes"]["shift"] == "torch.float16"
        assert res["center_dtypes"] == res["dtypes"]  # the center keeps each parameter's dtype
        assert res["rounds"] == MIXED["steps"] // MIXED["tau"]
        # the frozen parameter has no gradient and never moves, nor does its center
        first = res["trace"][0]["y"]["frozen"]
        assert not res["frozen_grad"]
        for rec in res["trace"]:
            assert rec["x2"]["frozen"] == first and rec["c1"]["frozen"] == first
        # step(closure): called once per step, its loss returned, on round steps too
        assert res["closure_calls"] == MIXED["steps"]
        assert [rec["returned"] for rec in res["trace"]] == [rec["loss"] for rec in res["trace"]]
    # every parameter moved at some point (except the frozen one): the test is not vacuous
    for name in ("lin.weight", "scale", "shift", "head.bias"):
        assert ranks[0]["trace"][-1]["x2"][name] != ranks[0]["trace"][0]["y"][name], name


# -------------------------------------------------------------------------------------------
# A real Horovod failure: the peer exits
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_peer_that_exits_is_an_error_on_the_survivor(hard_job):
    ranks = hard_job["ranks"]
    assert ranks[1] is not None and ranks[1]["peer_exit"] == {"left_at": 5}, hard_job["log"]
    assert ranks[0] is not None and "peer_exit" in ranks[0], (
        f"rank 0 never finished after its peer left (a hang?)\n{hard_job['log']}")
    got = ranks[0]["peer_exit"]
    assert got["error"] is not None, "the survivor trained on alone without an error"
    # rank 1 left before its step 5, with round 2 (step 4) perhaps unfinished: the error comes
    # with round 2 (steps 5-6) or round 3 (steps 7-8), not later
    assert got["raised_at"] in (5, 6, 7, 8), got["raised_at"]
    assert "Horovod" in got["error"]["type"] + got["error"]["message"], got["error"]
    # the optimizer stays failed, pointing at the cause
    assert got["later"] is not None and "earlier EASGD round failed" in got["later"]["message"]


# -------------------------------------------------------------------------------------------
# The trainer: resume growing the number of workers (1 -> 2)
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_resume_growing_the_number_of_workers(hard_job):
    from hvd_easgd.train import checkpoint as ckpt

    ranks = _ok(hard_job, "regrow")
    dir_a, dir_b = hard_job["dirs"]
    source = ckpt.load_checkpoint(ckpt.checkpoint_path(hard_job["source"], 8))
    assert source["world_size"] == 1
    text = "\n".join(ranks[0]["warnings"])
    assert "resuming a run of 1 workers with 2" in text, text
    for r, res in enumerate(ranks):
        a, b = res["a"], res["b"]
        # a: resumed to the checkpoint's own step, so no step was taken: every worker is the center
        assert a["world_size"] == 2 and a["step"] == 8
        assert a["local/test_error"] == a["center/test_error"], (r, a)
        assert a["local/test_loss"] == a["center/test_loss"], (r, a)
        # b: training went on with 2 workers, with rounds
        assert b["world_size"] == 2 and b["step"] == REGROW_MORE
        assert b["rounds"] > source["rounds"], (b["rounds"], source["rounds"])
    center = torch.load(dir_a / "center.pt")
    assert center.keys() and all(torch.equal(v, source["center_model"][k]) for k, v in center.items())
    _, grown = ckpt.load_latest(dir_b)
    assert grown["world_size"] == 2 and len(grown["workers"]) == 2
    w0, w1 = (w["model"] for w in grown["workers"])
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "the 2 workers did not train apart"


# -------------------------------------------------------------------------------------------
# The trainer's errors and warnings around resume (one worker, in this process)
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_rerun_into_a_run_dir_with_checkpoints_refuses(one_worker_run, tmp_path):
    from hvd_easgd.train.config import ConfigError, load_config

    run_dir = tmp_path / "run"
    shutil.copytree(one_worker_run, run_dir)
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest: step 8\).*--resume"):
        _quiet_run(load_config(DEMO, TRAIN), run_dir=run_dir)


@pytest.mark.timeout(120)
def test_resume_without_a_checkpoint_warns_and_starts_fresh(hvd1, tmp_path):
    from hvd_easgd.train.config import load_config
    from hvd_easgd.train.cli import run

    cfg = load_config(DEMO, TRAIN + ["train.max_steps=2", "checkpoint.every=0"])
    with pytest.warns(UserWarning, match="no readable checkpoint"):
        summary = run(cfg, run_dir=tmp_path / "empty", resume=True)
    assert summary["step"] == 2


@pytest.mark.timeout(120)
def test_resume_with_another_config_warns_naming_the_keys(one_worker_run, tmp_path):
    from hvd_easgd.train.config import load_config
    from hvd_easgd.train.cli import run

    run_dir = tmp_path / "run"
    shutil.copytree(one_worker_run, run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(load_config(DEMO, TRAIN + ["optimizer.lr=0.05"]), run_dir=run_dir,
                      resume=True)
    text = "\n".join(str(w.message) for w in caught)
    assert "differs from the checkpoint's in: optimizer.lr" in text, text
    assert "optimizer.tau" not in text and "resuming a run of" not in text, text
    assert summary["step"] == 8


# -------------------------------------------------------------------------------------------
# Constructor bad input (one worker, in this process)
# -------------------------------------------------------------------------------------------


def _model():
    return build_model(Case(), 0)


def _wrap(model=None, base=None, **kwargs):
    import hvd_easgd

    model = model or _model()
    base = base or torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("named_parameters", model.named_parameters())
    return hvd_easgd.ElasticOptimizer(base, **kwargs)


class NotACompressor:
    pass


def _bad_constructions():
    m = _model()
    named = list(m.named_parameters())
    return [
        ("not an optimizer", lambda: _wrap(base=[p for p in m.parameters()]),
         TypeError, r"torch\.optim\.Optimizer, got list"),
        ("wrapped twice", lambda: _wrap(m, base=_wrap(m)), TypeError, r"already an ElasticOptimizer"),
        ("duplicate names", lambda: _wrap(m, named_parameters=[("w", p) for _, p in named]),
         ValueError, r"duplicate names: w"),
        ("missing names", lambda: _wrap(m, named_parameters=named[:2]),
         ValueError, r"2 of the optimizer's parameters are not in named_parameters"),
        ("not pairs", lambda: _wrap(m, named_parameters=[p for _, p in named]),
         ValueError, r"\(name, parameter\) pairs"),
        ("buffer name clash", lambda: _wrap(m, named_buffers=[("0.weight", torch.zeros(2))]),
         ValueError, r"clash.*0\.weight"),
        ("bad compressor", lambda: _wrap(compression=NotACompressor()),
         TypeError, r"Horovod compressor"),
        ("compressor class name", lambda: _wrap(compression="fp16"),
         TypeError, r"Horovod compressor"),
        ("master_momentum < 0", lambda: _wrap(method="mdownpour", master_momentum=-0.1),
         ValueError, r"master_momentum must be in \[0, 1\), got -0\.1"),
        ("master_momentum = 1", lambda: _wrap(method="mdownpour", master_momentum=1.0),
         ValueError, r"master_momentum must be in \[0, 1\), got 1\.0"),
        ("master_momentum, wrong method", lambda: _wrap(method="downpour", master_momentum=0.5),
         ValueError, r"master_momentum is MDOWNPOUR's.*'downpour'"),
        ("master_momentum, easgd", lambda: _wrap(master_momentum=0.5),
         ValueError, r"method='mdownpour'.*'easgd'"),
        ("center_average kind", lambda: _wrap(center_average="mean"),
         ValueError, r"unknown center_average 'mean'"),
        ("center_average rate 0", lambda: _wrap(center_average="moving", center_average_rate=0.0),
         ValueError, r"center_average_rate must be in \(0, 1\], got 0"),
        ("center_average rate > 1",
         lambda: _wrap(center_average="moving", center_average_rate=1.5),
         ValueError, r"center_average_rate must be in \(0, 1\], got 1\.5"),
        ("alpha * p > 1", lambda: _wrap(alpha=1.5, beta=None),
         ValueError, r"alpha=1\.5 with 1 workers gives beta = p \* alpha = 1\.5 > 1"),
        ("nonfinite_patience 0", lambda: _wrap(nonfinite_patience=0),
         ValueError, r"nonfinite_patience"),
    ]


BAD_NAMES = [
    "not an optimizer", "wrapped twice", "duplicate names", "missing names", "not pairs",
    "buffer name clash", "bad compressor", "compressor class name", "master_momentum < 0",
    "master_momentum = 1", "master_momentum, wrong method", "master_momentum, easgd",
    "center_average kind", "center_average rate 0", "center_average rate > 1", "alpha * p > 1",
    "nonfinite_patience 0",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("label", BAD_NAMES)
def test_constructor_refuses_bad_input(hvd1, label):
    entries = _bad_constructions()
    assert [b[0] for b in entries] == BAD_NAMES
    _, build, exc, match = next(b for b in entries if b[0] == label)
    with pytest.raises(exc, match=match):
        opt = build()
        opt.close()


@pytest.mark.timeout(60)
def test_constructor_accepts_the_good_neighbours(hvd1):
    """The values next to each refused one are accepted (the checks are not over-eager)."""
    import horovod.torch as hvd

    for kwargs in ({"method": "mdownpour", "master_momentum": 0.0},
                   {"method": "mdownpour", "master_momentum": 0.99},
                   {"center_average": "moving", "center_average_rate": 1.0},
                   {"center_average": "running"}, {"alpha": 1.0, "beta": None},
                   {"compression": hvd.Compression.fp16}, {"nonfinite_patience": 1}):
        opt = _wrap(**kwargs)
        opt.close()
    m = _model()
    opt = _wrap(m, named_buffers=m.named_buffers())
    opt.close()


@pytest.mark.timeout(60)
def test_averaged_center_needs_an_average(hvd1):
    opt = _wrap()
    with pytest.raises(ValueError, match=r"no averaged center is kept.*center_average="):
        opt.averaged_center_state_dict()
    opt.close()
    opt = _wrap(center_average="running")
    assert set(opt.averaged_center_state_dict()) == set(opt.center_state_dict())
    opt.close()


@pytest.mark.timeout(60)
def test_add_param_group_after_wrapping_is_refused(hvd1):
    m = _model()
    extra = torch.nn.Parameter(torch.zeros(3))
    opt = _wrap(m)
    with pytest.raises(NotImplementedError, match="add every param group to the local optimizer"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1 and len(opt.optimizer.param_groups) == 1
    opt.close()
    # a group added to the local optimizer BEFORE wrapping is part of the center
    m = _model()
    base = torch.optim.SGD(list(m.parameters())[:2], lr=0.1)
    base.add_param_group({"params": list(m.parameters())[2:], "lr": 0.01})
    opt = _wrap(m, base=base)
    assert set(opt.center_state_dict()) == {n for n, _ in m.named_parameters()}
    opt.close()


@pytest.mark.timeout(60)
def test_state_dict_from_another_job_warns_at_the_caller(hvd1):
    m = _model()
    opt = _wrap(m)
    sd = opt.state_dict()
    sd["easgd"]["world_size"], sd["easgd"]["method"] = 4, "downpour"
    with pytest.warns(UserWarning) as caught:
        opt.load_state_dict(sd)
    text = [str(w.message) for w in caught]
    assert any("saved with 4 workers and this job has 1" in t for t in text), text
    assert any("saved by method 'downpour'; continuing with 'easgd'" in t for t in text), text
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]
    opt.close()


# -------------------------------------------------------------------------------------------
# hvd_easgd.DistributedOptimizer: Horovod's arguments
# -------------------------------------------------------------------------------------------

IGNORED = [
    ("backward_passes_per_step", 2),
    ("gradient_predivide_factor", 2.0),
    ("num_groups", 2),
    ("groups", 2),
    ("sparse_as_dense", True),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,value", IGNORED, ids=[n for n, _ in IGNORED])
def test_distributed_optimizer_warns_for_ignored_arguments(hvd1, name, value):
    import hvd_easgd

    m = _model()
    base = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = hvd_easgd.DistributedOptimizer(base, named_parameters=m.named_parameters(),
                                             **{name: value})
    mine = [w for w in caught if f"ignores {name}=" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert mine[0].filename == __file__  # it points at the caller's line
    assert len(caught) == 1
    assert isinstance(opt, hvd_easgd.ElasticOptimizer)
    opt.close()


@pytest.mark.timeout(60)
def test_distributed_optimizer_op(hvd1):
    import hvd_easgd

    def make(**kw):
        m = _model()
        return hvd_easgd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                              named_parameters=m.named_parameters(), **kw)

    with pytest.warns(UserWarning, match=r"ignores op=.*scaled the learning rate"):
        make(op=hvd1.Sum).close()
    with pytest.raises(ValueError, match="Adasum"):
        make(op=hvd1.Adasum)
    for op in (hvd1.Min, hvd1.Max, hvd1.Product):
        with pytest.raises(ValueError, match="not a gradient reduction EASGD can honour"):
            make(op=op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(op=hvd1.Average, process_set=hvd1.global_process_set).close()


@pytest.mark.timeout(60)
def test_distributed_optimizer_positional_arguments(hvd1):
    """Horovod's positional order: (optimizer, named_parameters, compression,
    backward_passes_per_step, op, gradient_predivide_factor, num_groups, groups,
    sparse_as_dense, process_set)."""
    import hvd_easgd

    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = hvd_easgd.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), hvd1.Compression.fp16,
            1, hvd1.Average, 1.0, 0, None, False, hvd1.global_process_set, tau=3)
    assert opt.communicator.compression is hvd1.Compression.fp16
    assert opt.tau == 3
    assert set(opt.center_state_dict()) == {n for n, _ in m.named_parameters()}
    opt.close()
    m = _model()
    with pytest.warns(UserWarning, match=r"ignores backward_passes_per_step=4"):
        opt = hvd_easgd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                             m.named_parameters(), hvd1.Compression.none, 4)
    opt.close()
    # EASGD's own settings are keywords only: a positional tau would be taken as Horovod's
    m = _model()
    with pytest.raises(TypeError):
        hvd_easgd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                       m.named_parameters(), hvd1.Compression.none, 1,
                                       hvd1.Average, 1.0, 0, None, False,
                                       hvd1.global_process_set, 3)
