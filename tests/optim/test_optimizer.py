"""The elastic optimizer, synchronous mode and API (issue 3).

Real Horovod Gloo jobs at 2 and 3 workers run tests/workers/opt_sync.py over many cases in one
job each; every case is replayed in tests/reference.py (the spec, single process) and compared.
Bad-input tests run in this process (`hvd.init()` gives a one-worker Horovod).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.hvdrun import run_workers
from tests.reference import (
    Case, Reference, assert_rank_matches, build_model, build_optimizer, max_abs_diff,
    reference_result,
)

TOL = 1e-6

# -------------------------------------------------------------------------------------------
# Cases (tau=3 with 10 steps: rounds at 3, 6, 9 and a last step that is not a round)
# -------------------------------------------------------------------------------------------

MATCH_CASES = [
    Case(name="easgd-sgd-wd", method="easgd", opt="sgd"),
    Case(name="eamsgd-nesterov", method="easgd", opt="nesterov", seed=1),
    Case(name="downpour", method="downpour", opt="sgd", seed=2),
    Case(name="mdownpour", method="mdownpour", opt="sgd", master_momentum=0.5, seed=3),
    Case(name="average", method="average", opt="nesterov", seed=4),
    Case(name="easgd-alpha-running", method="easgd", opt="sgd", alpha=0.2, beta=None, tau=2,
         steps=7, center_average="running", seed=5),
    Case(name="downpour-moving", method="downpour", opt="sgd", tau=2, steps=7,
         center_average="moving", average_rate=0.3, seed=6),
    Case(name="eamsgd-tau1", method="easgd", opt="nesterov", tau=1, steps=4, seed=7),
    Case(name="easgd-bn-buffers", method="easgd", opt="sgd", model="bn", buffers=True, seed=8),
    # the two above with every round started at its own step (start_early=False)
    Case(name="easgd-sgd-wd-late", method="easgd", opt="sgd", extra={"start_early": False}),
    Case(name="easgd-bn-buffers-late", method="easgd", opt="sgd", model="bn", buffers=True,
         seed=8, extra={"start_early": False}),
    # synchronous SGD for the first steps, then EASGD with rounds tau steps after the switch
    Case(name="eamsgd-warmup", method="easgd", opt="nesterov", tau=3, steps=11, seed=9,
         extra={"sync_sgd_steps": 4}),
    Case(name="easgd-bn-warmup", method="easgd", opt="sgd", model="bn", buffers=True, tau=2,
         steps=8, seed=10, extra={"sync_sgd_steps": 3}),
]
FP16_CASE = Case(name="easgd-fp16", method="easgd", opt="sgd", compression="fp16")
RESUME_ITEMS = [
    {"kind": "resume", "save_at": 7, "case": Case(name="resume-eamsgd-off-round",
                                                  opt="nesterov", seed=11).to_dict()},
    {"kind": "resume", "save_at": 6, "case": Case(name="resume-eamsgd-on-round",
                                                  opt="nesterov", seed=12).to_dict()},
    {"kind": "resume", "save_at": 5, "case": Case(name="resume-mdownpour", method="mdownpour",
                                                  master_momentum=0.5, tau=2, seed=13).to_dict()},
    {"kind": "resume", "save_at": 5, "case": Case(name="resume-running-avg", tau=2,
                                                  center_average="running", seed=14).to_dict()},
    {"kind": "resume", "save_at": 3, "case": Case(name="resume-in-warmup", opt="nesterov",
                                                  seed=15, extra={"sync_sgd_steps": 5}).to_dict()},
]


EARLY_ITEMS = [{"kind": "early", "case": Case(name="early-easgd", tau=3, steps=6,
                                              seed=21).to_dict()}]

MISMATCH = ["extra", "shape", "dtype", "tau", "beta", "method", "mode", "same"]
MISMATCH_ITEMS = [{"kind": "mismatch", "variant": v, "case": {"name": f"mismatch-{v}"}}
                  for v in MISMATCH]


def _items():
    items = [{"kind": "match", "case": c.to_dict()} for c in MATCH_CASES + [FP16_CASE]]
    return items + RESUME_ITEMS + MISMATCH_ITEMS + EARLY_ITEMS


def _by_name(results):
    """{case name: [rank0 result, rank1 result, ...]} for one job's rank dicts."""
    items = _items()
    out = {}
    for i, item in enumerate(items):
        out[item["case"]["name"]] = [r["results"][i] for r in results]
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def sync_job(request, tmp_path_factory):
    np_ = request.param
    out = tmp_path_factory.mktemp(f"sync_np{np_}")
    results = run_workers("opt_sync.py", out, np=np_, args=["--cases", json.dumps(_items())],
                          timeout=240, env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "60"})
    return np_, _by_name(results)


def _ok(ranks, name):
    for r, res in enumerate(ranks):
        assert res["ok"], f"{name}: rank {r} raised:\n{res['error']['traceback']}"
    return ranks


# -------------------------------------------------------------------------------------------
# The reference itself (cheap, no Horovod): guards against a wrong reference
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reference_first_round_by_hand():
    """Sync EASGD, tau=2, p=2: check the first round against a direct computation."""
    case = Case(method="easgd", opt="sgd", tau=2, steps=2, beta=0.8)
    from tests.reference import local_backward

    p = 2
    x0 = [t.detach().clone() for t in build_model(case, 0).parameters()]
    ys, xs = [], []
    for i in range(p):
        m = build_model(case, 0)
        o = build_optimizer(case, m.parameters())
        for t in (1, 2):
            local_backward(m, o, case, i, t)
            if t == 2:
                ys.append([q.detach().clone() for q in m.parameters()])
            o.step()
        xs.append([q.detach().clone() for q in m.parameters()])
    alpha, beta = 0.8 / p, 0.8
    want_c = [c + beta * ((ys[0][j] + ys[1][j]) / 2 - c) for j, c in enumerate(x0)]
    want_x = [[xs[i][j] - alpha * (ys[i][j] - x0[j]) for j in range(len(x0))] for i in range(p)]
    got = Reference(case, p).run().result()
    flat = lambda ts: [float(v) for t in ts for v in t.reshape(-1).tolist()]  # noqa: E731
    assert max_abs_diff(got["center"], flat(want_c)) < 1e-7
    for i in range(p):
        assert max_abs_diff(got["params"][i], flat(want_x[i])) < 1e-7
    # the elastic force is symmetric: sum_i alpha*(y_i - c) == beta*(mean y - c)
    assert got["rounds"] == 1 and got["steps"] == 2


@pytest.mark.timeout(60)
def test_reference_async_is_delayed_sync():
    """Async with one round equals no round until synchronize(), then the same correction."""
    sync = Reference(Case(method="easgd", tau=4, steps=4), 2).run().result()
    r = Reference(Case(method="easgd", mode="async", tau=4, steps=4), 2)
    r.run(synchronize=False)
    before = r.result()
    r.synchronize()
    after = r.result()
    assert before["center"] != sync["center"]
    assert max_abs_diff(after["center"], sync["center"]) == 0.0
    assert max_abs_diff(after["params"][1], sync["params"][1]) == 0.0
    # average: everyone ends on the center
    avg = Reference(Case(method="average", tau=2, steps=4), 3).run().result()
    for i in range(3):
        assert avg["params"][i] == avg["center"]


# -------------------------------------------------------------------------------------------
# Real workers vs the reference
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", MATCH_CASES, ids=[c.name for c in MATCH_CASES])
def test_sync_matches_reference(sync_job, case):
    np_, by_name = sync_job
    ranks = _ok(by_name[case.name], case.name)
    ref = reference_result(case, np_)
    for r, res in enumerate(ranks):
        assert_rank_matches(case, np_, r, res, ref, TOL)
        if case.buffers:
            d = max_abs_diff(res["buffers"], ref["buffers"][r])
            assert d < TOL, f"{case.name}: buffers of rank {r} differ by {d}"
    # the center replicas are bit-identical
    for r, res in enumerate(ranks[1:], 1):
        assert res["center"] == ranks[0]["center"], f"center of rank {r} != rank 0 (bitwise)"
        if case.center_average:
            assert res["avg_center"] == ranks[0]["avg_center"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", MATCH_CASES + [FP16_CASE],
                         ids=[c.name for c in MATCH_CASES + [FP16_CASE]])
def test_one_allreduce_per_round(sync_job, case):
    np_, by_name = sync_job
    ranks = _ok(by_name[case.name], case.name)
    # Sync EASGD starts a round's allreduce when the step before its own ends (start_early),
    # unless start_early=False; the last step may start one more.
    # A warm-up step averages the gradients (one allreduce each).
    early = case.method == "easgd" and case.extra.get("start_early", True)
    warmup = case.extra.get("sync_sgd_steps", 0)
    want = [1] * warmup + [0] * (case.steps - warmup)
    for t in range(warmup + case.tau, case.steps + 2, case.tau):
        at = t - 1 if early and t > 1 else t
        if at <= case.steps:
            want[at - 1] += 1
    rounds = (case.steps - warmup) // case.tau
    for r, res in enumerate(ranks):
        assert res["per_step"] == want, f"rank {r}: allreduces per step {res['per_step']}"
        assert res["sync_allreduces"] == 0
        s = res["stats"]
        assert res["counters"]["rounds"] == rounds
        assert s["steps"] == case.steps and s["rounds"] == sum(want) - warmup
        assert s["stalls"] == rounds  # sync: every round waits


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["easgd-sgd-wd", "easgd-bn-buffers"])
def test_starting_rounds_early_changes_no_bit(sync_job, name):
    """Parameters and center bit for bit, BatchNorm models too (their buffers differ: the
    next test)."""
    np_, by_name = sync_job
    early = _ok(by_name[name], name)
    late = _ok(by_name[f"{name}-late"], f"{name}-late")
    for r in range(np_):
        assert early[r]["per_step"] != late[r]["per_step"]  # the rounds did start earlier
        assert early[r]["params"] == late[r]["params"], f"rank {r}: params differ"
        assert early[r]["center"] == late[r]["center"], f"rank {r}: center differs"


@pytest.mark.timeout(300)
def test_a_round_started_early_survives_edits_close_and_load(sync_job):
    np_, by_name = sync_job
    for r, res in enumerate(_ok(by_name["early-easgd"], "early-easgd")):
        assert res["in_flight"], f"rank {r}: no round on the wire after the step before it"
        # only rank 0 edited a parameter between the launch and the round step
        assert res["warned"] == (["EditedParametersWarning"] if r == 0 else []), res["warned"]
        # closing waits for the round whose step never came, and applies nothing of it
        assert res["close"] == {"center_kept": True, "counters": {"steps": 2, "rounds": 0},
                                "dropped": 1}
        # loading a state dict drops it; the round step starts it again: nothing changes
        assert res["load_dropped"] == 1 and res["load_same"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["easgd-bn-buffers-late", "easgd-bn-buffers"])
def test_buffers_averaged_each_round(sync_job, name):
    """Started at the round step, a round leaves every worker at the mean of its buffers.
    Started early (the default), it averages them as they were before the round step's
    forward, and each worker keeps its own change since."""
    np_, by_name = sync_job
    case = next(c for c in MATCH_CASES if c.name == name)
    ranks = _ok(by_name[case.name], case.name)
    early = case.extra.get("start_early", True)
    steps = sorted(ranks[0]["bufs_after"], key=int)
    assert [int(t) for t in steps] == list(range(case.tau, case.steps + 1, case.tau))
    for t in steps:
        sent = [res["bufs_sent" if early else "bufs_before"][t] for res in ranks]
        mean = [sum(vals) / np_ for vals in zip(*sent)]
        for r, res in enumerate(ranks):
            want = mean
            if early:  # b - b_sent + mean
                want = [b - s + m for b, s, m in zip(res["bufs_before"][t], sent[r], mean)]
            d = max_abs_diff(res["bufs_after"][t], want)
            assert d < TOL, f"step {t}: rank {r} buffers off by {d}"
        # the workers really had different statistics before the round
        assert max_abs_diff(sent[0], sent[1]) > 1e-3
        if early:  # and the forward really moved them after the values sent
            assert max_abs_diff(ranks[0]["bufs_before"][t], sent[0]) > 1e-3
    # the center's copy of the buffers is exported, and bit-identical across ranks
    for r, res in enumerate(ranks):
        assert len(res["center_buffers"]) == len(res["buffers"]) > 0
        assert res["center_buffers"] == ranks[0]["center_buffers"], f"rank {r}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["easgd-sgd-wd", "easgd-bn-buffers"])
def test_center_state_dict_loads(sync_job, name):
    np_, by_name = sync_job
    case = next(c for c in MATCH_CASES if c.name == name)
    for r, res in enumerate(_ok(by_name[name], name)):
        assert res["csd_unexpected"] == []
        # (BatchNorm itself fills in a missing num_batches_tracked, so nothing is missing)
        assert res["csd_missing"] == []
        if case.buffers:
            assert {"1.running_mean", "1.running_var"} <= set(res["csd_keys"])
        assert res["csd_loaded_params"] == res["center"]
        assert res["csd_dtypes"] == ["torch.float32"]


@pytest.mark.timeout(300)
def test_fp16_compression(sync_job):
    np_, by_name = sync_job
    plain = _ok(by_name["easgd-sgd-wd"], "easgd-sgd-wd")
    fp16 = _ok(by_name[FP16_CASE.name], FP16_CASE.name)
    ref = reference_result(FP16_CASE, np_)
    for r in range(np_):
        b16, b32 = fp16[r]["allreduce_bytes"], plain[r]["allreduce_bytes"]  # metered at Horovod
        assert b32 > 0 and b16 * 2 == b32, (b16, b32)
        assert fp16[r]["csd_dtypes"] == ["torch.float32"]
        assert fp16[r]["center"] == fp16[0]["center"]
        d = max_abs_diff(fp16[r]["center"], ref["center"])
        assert d < 5e-3, f"fp16 center too far from the reference: {d}"
        assert max_abs_diff(fp16[r]["params"], ref["params"][r]) < 5e-3
    # compression really happened: not bit-exact with the uncompressed run
    assert fp16[0]["center"] != plain[0]["center"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("item", RESUME_ITEMS, ids=[i["case"]["name"] for i in RESUME_ITEMS])
def test_state_dict_round_trip(sync_job, item):
    np_, by_name = sync_job
    name = item["case"]["name"]
    case = Case.from_dict(item["case"])
    for r, res in enumerate(_ok(by_name[name], name)):
        full, resumed = res["full"], res["resumed"]
        warmup = case.extra.get("sync_sgd_steps", 0)
        assert res["loaded_counters"] == res["saved_counters"] == {
            "steps": item["save_at"], "rounds": max(0, item["save_at"] - warmup) // case.tau}
        assert resumed["params"] == full["params"], f"rank {r}: params differ after resuming"
        assert resumed["center"] == full["center"], f"rank {r}: center differs after resuming"
        assert resumed["counters"] == full["counters"]
        if case.center_average:
            assert resumed["avg_center"] == full["avg_center"]
        # and the uninterrupted run is the algorithm
        ref = reference_result(case, np_)
        assert max_abs_diff(full["center"], ref["center"]) < TOL


# -------------------------------------------------------------------------------------------
# Mismatched models across workers
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_mismatched_models_fail_on_every_rank(sync_job):
    """Rank 1 (of 2 or 3) builds another model, or wraps with another setting: construction
    raises on EVERY rank (a rank that went on would hang at its first round)."""
    np_, by_name = sync_job
    results = [{"results": {v: {k: x for k, x in res.items() if k != "ok"}
                            for v, res in zip(MISMATCH, ranks)}}
               for ranks in zip(*(_ok(by_name[f"mismatch-{v}"], v) for v in MISMATCH))]
    assert len(results) == np_
    first = {"extra": "extra", "shape": "0.weight", "dtype": "2.bias"}
    for r, res in enumerate(results):
        for variant, pname in first.items():
            got = res["results"][variant]
            assert got["raised"], f"rank {r}: {variant} mismatch did not raise"
            assert pname in got["message"], (variant, got["message"])
            assert "rank 1 has" in got["message"], (variant, got["message"])
        assert res["results"]["same"] == {"raised": False}
    # "shape" names the first mismatch, not a later one
    assert "2.weight" not in results[0]["results"]["shape"]["message"]
    # settings that differ across workers name the setting, both values and the odd rank
    for variant, values in {"tau": ("tau=2", "tau=3"), "beta": ("beta=0.9", "beta=0.5"),
                            "method": ("'easgd'", "'average'"), "mode": ("'sync'", "'async'")}.items():
        for r, res in enumerate(results):
            got = res["results"][variant]
            assert got["raised"], f"rank {r}: a different {variant} did not raise"
            assert "settings differ" in got["message"] and "rank(s) [1]" in got["message"], got
            assert all(v in got["message"] for v in values), (variant, got["message"])


# -------------------------------------------------------------------------------------------
# The Horovod one-line swap
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_horovod_swap_script_trains(tmp_path):
    results = run_workers("opt_horovod_swap.py", tmp_path, np=2, timeout=150)
    for r, res in enumerate(results):
        assert res["final_loss"] < 0.5 * res["initial_loss"], res
        assert res["missing"] == []
        assert res["lrs"][:5] == pytest.approx([0.05, 0.05, 0.05, 0.025, 0.025])
        assert res["base_lr"] == res["lrs"][-1]
        assert res["zero_grad_ok"]
        assert res["rounds"] == res["steps"] // 4 and res["rounds"] > 10
        assert res["center_names"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
        assert len(res["center"]) == len(res["params"]) == 64 * 64 + 64 + 64 * 10 + 10
    # the centers themselves are bit-identical across ranks (final_loss is averaged over the
    # ranks by hvd.allreduce, so it is equal whatever the centers are) ...
    assert results[0]["center"] == results[1]["center"]
    assert results[0]["local_final_loss"] == results[1]["local_final_loss"]
    # ... while the workers' own parameters are not (each trained on its shard)
    assert max(abs(a - b) for a, b in zip(results[0]["params"], results[1]["params"])) > 1e-4


# -------------------------------------------------------------------------------------------
# In-process (one Horovod worker): bad input, warnings, old state dicts
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hvd1():
    import horovod.torch as hvd

    hvd.init()
    assert hvd.size() == 1
    return hvd


def _model_opt():
    model = build_model(Case(), 0)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


BAD = [
    ({"tau": 0}, ValueError, r"tau"),
    ({"tau": -3}, ValueError, r"tau"),
    ({"tau": 2.5}, (TypeError, ValueError), r"tau.*int"),
    ({"tau": "3"}, (TypeError, ValueError), r"tau.*int"),
    ({"tau": True}, (TypeError, ValueError), r"tau.*int"),
    ({"beta": 0}, ValueError, r"beta.*\(0, 1\]"),
    ({"beta": -0.1}, ValueError, r"beta.*\(0, 1\]"),
    ({"beta": 1.5}, ValueError, r"beta.*\(0, 1\]"),
    ({"alpha": 0, "beta": None}, ValueError, r"alpha"),
    ({"alpha": -0.5, "beta": None}, ValueError, r"alpha"),
    ({"alpha": 0.1, "beta": 0.9}, ValueError, r"(alpha.*beta|beta.*alpha).*not both|not both"),
    ({"method": "sgd"}, ValueError, r"method.*easgd"),
    ({"method": "EASGD!"}, ValueError, r"method.*downpour"),
    ({"mode": "asynchronous"}, ValueError, r"mode.*sync"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_input(hvd1, kwargs, exc, match):
    import hvd_easgd

    model, base = _model_opt()
    with pytest.raises(exc, match=match):
        hvd_easgd.ElasticOptimizer(base, named_parameters=model.named_parameters(), **kwargs)


@pytest.mark.timeout(60)
def test_allreduce_counter_counts_each_call_once(hvd1):
    """The instrument of test_one_allreduce_per_round: every entry point counts, once."""
    from tests.workers.opt_common import AllreduceCounter

    t = torch.ones(3)
    with AllreduceCounter() as c:
        hvd1.allreduce(t, name="c1")
        hvd1.allreduce_(t.clone(), name="c2")
        hvd1.synchronize(hvd1.allreduce_async(t, name="c3"))
        hvd1.synchronize(hvd1.allreduce_async_(t.clone(), name="c4"))
        hvd1.grouped_allreduce([t, t.clone()], name="c5")
        hvd1.synchronize(hvd1.grouped_allreduce_async([t, t.clone()], name="c6"))
        hvd1.synchronize(hvd1.grouped_allreduce_async_([t.clone(), t.clone()], name="c7"))
        import horovod.torch.mpi_ops as mpi_ops

        mpi_ops.allreduce(t, name="c8")
        assert c.count == 8
    hvd1.allreduce(t, name="c9")  # uninstalled
    assert c.count == 8


@pytest.mark.timeout(60)
def test_collective_meter_records_family_process_set_and_bytes(hvd1):
    """The instrument of the byte and call counts: each collective once, with its process
    set's ranks and the bytes of the tensors handed in (whatever entry point)."""
    import horovod.torch.mpi_ops as mpi_ops

    from tests.workers.opt_common import Collective, CollectiveMeter

    t = torch.ones(3)
    with CollectiveMeter() as meter:
        hvd1.allreduce(t, name="m1")
        hvd1.allgather(t.double(), name="m2")
        hvd1.broadcast_(t.clone(), root_rank=0, name="m3")
        out = [torch.empty(3), torch.empty(2)]
        hvd1.synchronize(mpi_ops._grouped_allreduce_async(
            [t, torch.ones(2)], out, "m4", hvd1.Sum, 1.0, 1.0, mpi_ops.global_process_set))
    hvd1.allreduce(t, name="m5")  # uninstalled
    assert meter.calls == [Collective("allreduce", (0,), 12), Collective("allgather", (0,), 24),
                           Collective("broadcast", (0,), 12), Collective("allreduce", (0,), 20)]
    assert meter.bytes_by_ranks() == {(0,): 68}
    assert meter.calls_of("allreduce") == 2 and meter.calls_of("broadcast") == 1


@pytest.mark.timeout(60)
def test_alpha_beta_resolution(hvd1):
    import hvd_easgd

    from hvd_easgd.optim.checks import resolve_coefficients

    assert resolve_coefficients(0.3, None, 3) == pytest.approx((0.3, 0.9))
    assert resolve_coefficients(None, 0.6, 2) == pytest.approx((0.3, 0.6))
    # one worker (this process): whatever was asked, it is left alone and the center follows
    for given in ({"alpha": 0.3}, {"beta": 0.6}):
        model, base = _model_opt()
        opt = hvd_easgd.ElasticOptimizer(base, named_parameters=model.named_parameters(),
                                         **given)
        assert (opt.alpha, opt.beta) == (0.0, 1.0)
        opt.close()
    with pytest.raises(ValueError, match="beta = p \\* alpha = 1.2 > 1"):
        resolve_coefficients(0.4, None, 3)


@pytest.mark.timeout(60)
def test_horovod_arguments(hvd1):
    import hvd_easgd

    model, base = _model_opt()
    with pytest.raises(ValueError, match="Adasum"):
        hvd_easgd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                       op=hvd1.Adasum)
    for kwargs in ({"backward_passes_per_step": 2}, {"gradient_predivide_factor": 2.0}):
        model, base = _model_opt()
        name = next(iter(kwargs))
        with pytest.warns(UserWarning, match=name):
            opt = hvd_easgd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                                 **kwargs)
        opt.close()
    # no warning for Horovod's defaults
    model, base = _model_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = hvd_easgd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                             compression=hvd1.Compression.none, tau=2)
    assert isinstance(opt, hvd_easgd.ElasticOptimizer) and opt.tau == 2
    opt.close()


@pytest.mark.timeout(60)
def test_old_state_dict_loads_with_warning(hvd1):
    import hvd_easgd

    case = Case(opt="nesterov")
    model = build_model(case, 0)
    plain = build_optimizer(case, model.parameters())
    from tests.reference import local_backward

    for t in (1, 2):
        local_backward(model, plain, case, 0, t)
        plain.step()
    old = plain.state_dict()  # a checkpoint of the plain optimizer: no EASGD keys
    model2 = build_model(case, 0)
    model2.load_state_dict(model.state_dict())
    opt = hvd_easgd.ElasticOptimizer(build_optimizer(case, model2.parameters()),
                                     named_parameters=model2.named_parameters(), tau=3)
    with pytest.warns(UserWarning):
        opt.load_state_dict(old)
    # the base optimizer's state (momentum buffers) came through
    assert len(opt.optimizer.state) == len(list(model2.parameters()))
    bufs = [opt.optimizer.state[p]["momentum_buffer"] for p in model2.parameters()]
    want = [plain.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(bufs, want))
    local_backward(model2, opt, case, 0, 3)
    opt.step()
    opt.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compression,dtype", [("none", torch.float32), ("fp16", torch.float32),
                                               ("none", torch.bfloat16), ("fp16", torch.float16)])
def test_rounds_reuse_their_wire_buffers(hvd1, compression, dtype):
    """Horovod's output (and the cast copies) are allocated once per round buffer, not per
    round; the sums are those of Horovod's own compressor."""
    from hvd_easgd.optim.exchange import Communicator, ExchangeStats

    comp = getattr(hvd1.Compression, compression)
    comm = Communicator(comp, f"wire.{compression}.{dtype}", ExchangeStats())
    buffers = [torch.randn(1000).to(dtype), torch.randn(7).to(dtype)]
    seen = []  # the results are held, so fresh ones could not reuse their memory
    for round_index in range(3):
        for b in buffers:
            b.normal_()
        result = comm.wait(comm.start(buffers, round_index))
        expected = [comp.decompress(*comp.compress(b)) for b in buffers]  # one worker: the sum
        for got, want, b in zip(result, expected, buffers):
            assert got.dtype == b.dtype and got.shape == b.shape
            assert torch.equal(got, want)
        seen.append(result)
    assert all(a is b for r in seen[1:] for a, b in zip(r, seen[0]))
    # async mode's other round buffer (same layout) goes through the same kept buffers
    other = [torch.randn(1000).to(dtype), torch.randn(7).to(dtype)]
    result = comm.wait(comm.start(other, 9))
    assert all(a is b for a, b in zip(result, seen[0]))
    assert all(torch.equal(a, comp.decompress(*comp.compress(b))) for a, b in zip(result, other))
    comm.wire.forget()  # after a cancelled round: fresh buffers
    result = comm.wait(comm.start(buffers, 3))
    assert not any(a is b for a, b in zip(result, seen[0]))
    assert comm.stats.allreduce_calls == 5


@pytest.mark.timeout(60)
def test_a_compressor_of_your_own_is_called_as_horovod_calls_it(hvd1):
    from hvd_easgd.optim.exchange import Communicator, ExchangeStats

    calls = []

    class Halves(hvd1.Compression.none):
        @staticmethod
        def compress(tensor):
            calls.append("compress")
            return tensor / 2, None

        @staticmethod
        def decompress(tensor, ctx):
            calls.append("decompress")
            return tensor * 2

    comm = Communicator(Halves, "wire.custom", ExchangeStats())
    buffer = torch.arange(6, dtype=torch.float32)
    assert torch.equal(comm.wait(comm.start([buffer], 0))[0], buffer)
    assert calls == ["compress", "decompress"]


# -------------------------------------------------------------------------------------------
# One worker: plain SGD, the center following it
# -------------------------------------------------------------------------------------------


LONE_CASE = Case(name="lone", opt="nesterov", tau=3, steps=10, seed=41)


@pytest.mark.timeout(300)
def test_one_worker_trains_as_plain_sgd(tmp_path):
    """Under `horovodrun -np 1` EASGD leaves the worker alone (bit for bit the local optimizer
    by itself) and the center takes the worker's value at every round (alpha 0, beta 1)."""
    [res] = run_workers("opt_lone.py", tmp_path, np=1, timeout=200,
                        args=["--cases", json.dumps([LONE_CASE.to_dict()])])
    ref = Reference(LONE_CASE, 1).run().result()
    for mode in ("sync", "async"):
        got = res[mode]
        assert got["params"] == res["plain"], f"{mode}: the lone worker was pulled"
        assert (got["alpha"], got["beta"]) == (0.0, 1.0)
        assert got["rounds"] == 3
        assert max_abs_diff(got["center"], ref["center"]) < TOL
    # the center is the worker's value before the last round step (step 9)'s update
    assert ref["center"] != res["plain"]


@pytest.mark.timeout(60)
def test_switch_point_travels_in_the_state_dict(hvd1):
    """A run resumed from a state dict switches to EASGD at the step it was saved with."""
    import hvd_easgd

    model, base = _model_opt()
    opt = hvd_easgd.ElasticOptimizer(base, model.named_parameters(), tau=2, sync_sgd_steps=6)
    sd = opt.state_dict()
    assert sd["easgd"]["sync_sgd_steps"] == 6
    opt.close()
    model, base = _model_opt()
    other = hvd_easgd.ElasticOptimizer(base, model.named_parameters(), tau=2, sync_sgd_steps=2)
    with pytest.warns(UserWarning, match="keeping the saved switch point, 6"):
        other.load_state_dict(sd)
    assert other.sync_sgd_steps == 6 and other.in_sync_sgd
    assert [other.round_due(t) for t in range(1, 11)] == [False] * 7 + [True, False, True]
    other.close()
    with pytest.raises(ValueError, match="sync_sgd_steps must be an integer >= 0"):
        hvd_easgd.ElasticOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   model.named_parameters(), sync_sgd_steps=-1)
    with pytest.raises(ValueError, match="survivors must be one of 'own', 'center'"):
        hvd_easgd.ElasticOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   model.named_parameters(), survivors="all")
