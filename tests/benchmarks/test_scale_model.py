"""The honest benchmark (benchmarks/baselines.py) and the scale model (benchmarks/scale_model.py).

Behaviour only: which rows are measured, that the ratios follow from the absolute numbers, the
formulas against hand-computed values, which Horovod settings each job runs with. Wall-clock
numbers are never asserted.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from hvd_easgd.optim import tuning
from tests.hvdrun import REPO, worker_env

sys.path.insert(0, str(REPO))
from benchmarks import scale_model as sm  # noqa: E402


# ------------------------------------------------------------------ baselines.py --quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "quick.json"
    env = worker_env()
    for name in tuning.HOROVOD_SETTINGS:  # a developer's own settings must not leak in
        env.pop(name, None)
    env.pop(tuning.DISABLE_ENV, None)
    proc = subprocess.run([sys.executable, "benchmarks/baselines.py", "--quick", "--json",
                           str(out)], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


def table_rows(stdout: str) -> list:
    """The first cell of every row of the first markdown table printed."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_quick_measures_every_row(quick):
    payload, stdout = quick
    rows = {r["name"]: r for r in payload["rows"]}
    expected = {"plain-nocomm", "torch-ddp", "torch-averager-tau2", "torch-averager-tau4",
                "hvd-sgd", "easgd-sync-tau2", "easgd-sync-tau4", "easgd-async-tau2",
                "easgd-async-tau4", "hvd-nocomm@default", "hvd-nocomm@tuned"}
    assert set(rows) == expected
    assert payload["failures"] == []
    for name, row in rows.items():
        assert len(row["per_rep_samples_per_sec"]) == 1, name
        assert all(s > 0 for s in row["per_rep_samples_per_sec"]), name
        assert row["median_samples_per_sec"] > 0, name
    # The table is printed, a line per row, and the load before every job is recorded.
    assert table_rows(stdout) == [r["name"] for r in payload["rows"]]
    assert set(table_rows(stdout)) == expected
    jobs = {j["job"] for j in payload["jobs"]}
    assert jobs == {"plain", "torch", "hvd-default", "hvd-easgd"}
    assert all(isinstance(j["load_1min"], float) for j in payload["jobs"])


def test_quick_ratios_follow_from_the_absolute_numbers(quick):
    payload, _ = quick
    rows = {r["name"]: r for r in payload["rows"]}
    limit = rows["plain-nocomm"]["per_rep_samples_per_sec"]
    assert rows["plain-nocomm"]["median_vs_limit"] == 1.0
    for name, row in rows.items():
        sps = row["per_rep_samples_per_sec"]
        # --quick does not bracket: every row's reference is the repetition's plain run.
        assert row["per_rep_limit_reference"] == limit, name
        assert row["per_rep_vs_limit"] == pytest.approx([s / l for s, l in zip(sps, limit)])
        assert row["median_vs_limit"] == pytest.approx(statistics.median(row["per_rep_vs_limit"]))
        assert row["median_samples_per_sec"] == pytest.approx(statistics.median(sps))
        tau = row["tau"] if row["tau"] in (2, 4) else 4  # rows without a tau: --target-tau
        avg = rows[f"torch-averager-tau{tau}"]
        assert row["averager_reference"] == f"torch-averager-tau{tau}"
        assert row["per_rep_vs_averager_raw"] == pytest.approx(
            [s / a for s, a in zip(sps, avg["per_rep_samples_per_sec"])])
        assert row["per_rep_vs_averager"] == pytest.approx(
            [r / a for r, a in zip(row["per_rep_vs_limit"], avg["per_rep_vs_limit"])])
    assert rows["torch-averager-tau4"]["median_vs_averager"] == 1.0


def test_bracketing_pairs_each_job_with_the_limit_around_it():
    from benchmarks.baselines import LIMIT, pair_with_limit

    def plain(v):
        return ("plain", {LIMIT: {"samples_per_sec": v}})

    results = [plain(100.0), ("torch", {"a": {"samples_per_sec": 50.0}}), plain(80.0),
               ("hvd", {"b": {"samples_per_sec": 60.0}, "c": {"samples_per_sec": 70.0}}),
               ("plain", None),  # a failed run: the next one is used instead
               ("late", {"d": {"samples_per_sec": 1.0}}), plain(90.0)]
    rows = pair_with_limit(results)
    assert rows[LIMIT]["samples_per_sec"] == 90.0  # the median of 100, 80, 90
    assert rows[LIMIT]["limit_ref"] == 90.0
    assert rows["a"]["limit_ref"] == 90.0        # (100 + 80) / 2
    assert rows["b"]["limit_ref"] == rows["c"]["limit_ref"] == 85.0   # (80 + 90) / 2
    assert rows["d"]["limit_ref"] == 85.0
    alone = pair_with_limit([("torch", {"a": {"samples_per_sec": 1.0}}), plain(70.0)])
    assert alone["a"]["limit_ref"] == 70.0


def test_quick_bytes_and_settings(quick):
    payload, _ = quick
    rows = {r["name"]: r for r in payload["rows"]}
    pbytes = payload["config"]["param_bytes"]
    for tau in (2, 4):
        # torch's averager and EASGD: exactly the parameter bytes once per tau steps.
        assert rows[f"torch-averager-tau{tau}"]["bytes_per_step"] * tau == pbytes
        assert rows[f"torch-averager-tau{tau}"]["bytes_exact"] is True
        for mode in ("sync", "async"):
            # Exactly one parameter-sized message per round, not a byte more.
            row = rows[f"easgd-{mode}-tau{tau}"]
            (rep,) = row["per_rep"]
            assert rep["extra_bytes_per_round"] == row["bytes_per_step"] * tau - pbytes == 0
            assert row["bytes_exact"] is True, row["name"]
    assert rows["hvd-sgd"]["bytes_per_step"] == pbytes
    assert rows["plain-nocomm"]["bytes_per_step"] == 0
    # Settings applied: hvd-easgd's in the EASGD job, Horovod's own defaults in the other.
    settings = payload["horovod_settings"]
    assert settings["hvd-easgd"] == tuning.HOROVOD_SETTINGS
    assert settings["hvd-default"] == tuning.HOROVOD_DEFAULTS


def test_quick_targets_are_checked(quick):
    payload, _ = quick
    names = [t["target"] for t in payload["targets"]]
    assert any("bytes/step" in n for n in names)
    assert any(n.startswith("easgd-sync-tau4 >= 0.95") for n in names)
    assert any(n.startswith("easgd-async-tau4 >= torch-averager-tau4") for n in names)


def test_baselines_refuses_to_run_under_horovod():
    env = worker_env({"HOROVOD_RANK": "0"})
    env["HOROVOD_RANK"] = "0"
    proc = subprocess.run([sys.executable, "benchmarks/baselines.py", "--quick"], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "plain program" in proc.stderr


# ------------------------------------------------------------------ scale_model.py


def test_ring_allreduce_formula():
    # 2 (p-1)/p * B / bw + 2 (p-1) * a, by hand: 2*7/8 * 100e6 / 12.5e9 = 0.014; 14 * 5e-6.
    assert sm.ring_allreduce_seconds(100e6, 8, 12.5e9, 5e-6) == pytest.approx(0.014 + 70e-6)
    assert sm.ring_allreduce_seconds(1e6, 2, 1e9, 1e-3) == pytest.approx(1e-3 + 2e-3)
    assert sm.ring_allreduce_seconds(1e9, 1, 1.0, 1.0) == 0.0
    # Bandwidth term tends to 2 B / bw for many workers; latency grows linearly.
    big = sm.ring_allreduce_seconds(1e6, 1000, 1e9, 0.0)
    assert big == pytest.approx(2 * 999 / 1000 * 1e-3)


def test_step_formulas():
    # sync SGD: t_c + max(0, T_ar - overlap * t_c)
    assert sm.sync_sgd_step(0.1, 0.08, 0.5) == pytest.approx(0.13)
    assert sm.sync_sgd_step(0.1, 0.04, 0.5) == pytest.approx(0.1)
    assert sm.sync_sgd_step(0.1, 0.04, 0.0) == pytest.approx(0.14)
    # EASGD sync started at its own step: t_c + (t_s + T_ar + t_m) / tau
    assert sm.easgd_sync_step(0.1, 0.08, 16, 0.002, 0.01) == pytest.approx(0.1 + 0.092 / 16)
    assert sm.easgd_sync_step(0.1, 0.08, 1) == pytest.approx(0.18)
    # ... started a step early: up to one step's compute hides the exchange
    assert sm.easgd_sync_step(0.1, 0.08, 16, 0.002, 0.01, hidden=0.1) == pytest.approx(
        0.1 + 0.002 / 16)
    assert sm.easgd_sync_step(0.026, 0.058, 4, 0.004, 0.01, hidden=0.026) == pytest.approx(
        0.026 + (0.004 + 0.042) / 4)
    # EASGD async: t_c + (t_m + max(0, t_s + T_ar - tau t_c)) / tau
    assert sm.easgd_async_step(0.1, 0.08, 1, 0.002, 0.01) == pytest.approx(0.102)
    assert sm.easgd_async_step(0.026, 0.058, 2, 0.0, 0.01) == pytest.approx(0.026 + 0.016 / 2)
    assert sm.easgd_async_step(0.026, 0.058, 4, 0.004, 0.01) == pytest.approx(0.026 + 0.001)
    # The smallest tau hiding the exchange: ceil((t_s + T_ar) / t_c).
    assert sm.hiding_tau(0.026, 0.058, 0.01) == 3
    assert sm.hiding_tau(0.1, 0.05) == 1
    assert sm.hiding_tau(0.01, 0.04) == 4
    assert sm.round_math_seconds(1e8, 1e12, 8) == pytest.approx(8e-4)


def test_fit_recovers_bandwidth_and_latency():
    p, bw, a = 3, 2.5e9, 40e-6
    points = {b: sm.ring_allreduce_seconds(b, p, bw, a) for b in (8, 1 << 16, 1 << 20, 1 << 25)}
    fit = sm.fit_alpha_beta(points, p)
    assert fit["bandwidth"] == pytest.approx(bw, rel=1e-6)
    assert fit["latency"] == pytest.approx(a, rel=1e-6)


def test_scale_table_rows_follow_the_formulas(tmp_path, capsys):
    out = tmp_path / "scale.json"
    payload = sm.main(["--gpus", "a100-amp", "--networks", "25g", "--workers", "8", "256",
                       "--json", str(out)])
    printed = capsys.readouterr().out
    table = payload["tables"][0]
    # the printed table is the JSON's: a line per worker count, its sync SGD efficiency
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    cells = [line.split("|")[1:-1] for line in printed.splitlines()
             if line.startswith("|") and not line.startswith("|-")]
    assert [c[0].strip() for c in cells[1:]] == ["8", "256"]
    assert [c[2].strip() for c in cells[1:]] == [
        f"{100 * r['sync_sgd']['efficiency']:.0f}%" for r in table["rows"]]
    a = payload["assumptions"]
    nbytes = sm.RESNET50_PARAMS * 4
    t_c = 64 / 2470.0
    t_m = 8 * nbytes / 2.0e12
    t_s = float(a["easgd_cycle_ms"]) / 2e3
    for row in table["rows"]:
        p = row["p"]
        t_ar = 2 * (p - 1) / p * nbytes / (25e9 / 8) + 2 * (p - 1) * 25e-6
        assert row["allreduce_ms"] == pytest.approx(1e3 * t_ar)
        sgd = t_c + max(0.0, t_ar + 0.5e-3 - 0.5 * t_c)
        assert row["sync_sgd"]["step_ms"] == pytest.approx(1e3 * sgd)
        assert row["easgd_sync"][16]["step_ms"] == pytest.approx(
            1e3 * (t_c + (t_m + max(0.0, t_s + t_ar - t_c)) / 16))
        assert row["easgd_async"][16]["efficiency"] == pytest.approx(t_c / (t_c + t_m / 16))
        assert row["hiding_tau"] == math.ceil((t_s + t_ar) / t_c)
        assert row["sync_sgd"]["images_per_sec"] == pytest.approx(p * 64 / sgd)


def test_check_predicts_every_row_from_the_probe(tmp_path, monkeypatch):
    # A baselines.py JSON with one row of each kind, and a probe that measured exactly the
    # ring model with a known bandwidth and latency: the predictions are the formulas.
    p, batch, nbytes = 2, 32, 100 * 2**20
    limit = 400.0  # samples/s of the physical limit: t_c = 64 / 400 = 0.16 s per step
    rows = [{"name": name, "tau": tau, "median_samples_per_sec": sps}
            for name, tau, sps in [("plain-nocomm", None, limit), ("torch-ddp", None, 200.0),
                                   ("torch-averager-tau16", 16, 380.0), ("hvd-sgd", None, 150.0),
                                   ("easgd-sync-tau16", 16, 370.0),
                                   ("easgd-async-tau16", 16, 390.0),
                                   ("easgd-synclate-tau16@cycle20ms", 16, 365.0),
                                   ("hvd-nocomm@tuned", None, 390.0)]]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({
        "config": {"np": p, "batch": batch, "param_bytes": nbytes},
        "rows": rows,
        "horovod_settings": {"hvd-default": {"HOROVOD_CYCLE_TIME": "1"},
                             "hvd-easgd": {"HOROVOD_CYCLE_TIME": "20"}}}))
    bw, lat, pass_s = 2e9, 50e-6, 0.01
    sizes = [8, 1 << 20, nbytes]
    monkeypatch.setattr(sm, "run_probe", lambda p_, b_, c_: {
        "size": p_, "pass_seconds": pass_s,
        "allreduce": {str(b): sm.ring_allreduce_seconds(b, p_, bw, lat) for b in sizes}})
    result = sm.check(sm.parse_args(["--check", str(path), "--check-math-passes", "4"]))
    (r,) = result["check"]
    assert r["fit"]["bandwidth"] == pytest.approx(bw) and r["fit"]["latency"] == pytest.approx(lat)
    t_c, t_ar = 0.16, sm.ring_allreduce_seconds(nbytes, p, bw, lat)
    assert r["compute_ms"] == pytest.approx(160.0)
    pred = {x["name"]: x for x in r["rows"]}
    assert set(pred) == {"torch-ddp", "torch-averager-tau16", "hvd-sgd", "easgd-sync-tau16",
                         "easgd-async-tau16", "easgd-synclate-tau16@cycle20ms"}
    # sync started a step early: one step of compute hides the exchange (at best)
    sync = t_c + (4 * pass_s + max(0.0, 0.010 + t_ar - t_c)) / 16
    assert pred["easgd-sync-tau16"]["predicted_ideal"] == pytest.approx(64 / sync)
    assert pred["easgd-sync-tau16"]["predicted_exposed"] == pytest.approx(
        64 / (t_c + (t_ar + 4 * pass_s) / 16))
    # started at its own step: nothing hides it
    late = t_c + (0.010 + t_ar + 4 * pass_s) / 16
    assert pred["easgd-synclate-tau16@cycle20ms"]["predicted_ideal"] == pytest.approx(64 / late)
    assert pred["easgd-synclate-tau16@cycle20ms"]["predicted_exposed"] == pytest.approx(64 / late)
    assert pred["easgd-async-tau16"]["predicted_ideal"] == pytest.approx(
        64 / sm.easgd_async_step(t_c, t_ar, 16, 4 * pass_s, 0.010))
    assert pred["easgd-async-tau16"]["predicted_exposed"] == pytest.approx(
        64 / (t_c + (t_ar + 4 * pass_s) / 16))
    assert pred["hvd-sgd"]["predicted_exposed"] == pytest.approx(64 / (t_c + t_ar + 0.0005))
    assert pred["torch-ddp"]["predicted_ideal"] == pytest.approx(
        64 / sm.sync_sgd_step(t_c, t_ar, 0.5))
    for x in pred.values():
        assert x["predicted_exposed"] <= x["predicted_ideal"] + 1e-9
        assert x["error_vs_ideal"] == pytest.approx(x["measured"] / x["predicted_ideal"] - 1)
