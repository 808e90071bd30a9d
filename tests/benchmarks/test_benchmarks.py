"""Smoke tests of the benchmarks, with tiny settings, under real ``horovodrun -np 2`` jobs.

They check that every script runs end to end and reports every variant, and one real property:
the communication volume. The bytes Horovod is handed (counted by wrapping Horovod's own
allreduce functions) must be exactly the parameter bytes once per ``tau`` steps for EASGD (half
with fp16), and exactly the gradient bytes every step for ``hvd.DistributedOptimizer``.
Wall-clock numbers are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.hvdrun import REPO, horovodrun, worker_env

HIDDEN = 16  # the "heavy" MLP shrunk to a few hundred kB
HEAVY_PARAMS = (3072 * HIDDEN + HIDDEN) + (HIDDEN * 3072 + 3072) + (3072 * 10 + 10)
HEAVY_TENSORS = 6  # three Linear layers: weight + bias each
TINY_THROUGHPUT = ["benchmarks/throughput.py", "--model", "heavy", "--hidden", str(HIDDEN),
                   "--batch", "4", "--steps", "4", "--warmup", "1", "--reps", "1"]


def _by_name(payload: dict) -> dict:
    return {v["name"]: v for v in payload["variants"]}


def test_throughput_reports_every_variant_and_exact_bytes(tmp_path):
    out = tmp_path / "throughput.json"
    horovodrun([sys.executable, *TINY_THROUGHPUT, "--taus", "1", "4",
                "--baseline-tau", "4", "--json", str(out)], timeout=240)
    payload = json.loads(out.read_text())
    variants = _by_name(payload)
    expected = {"no-comm", "hvd-sgd", "downpour-sync-tau4", "average-sync-tau4",
                *(f"easgd-{mode}-tau{t}" for mode in ("sync", "async") for t in (1, 4))}
    assert set(variants) == expected
    assert payload["config"]["parameters"] == HEAVY_PARAMS
    pbytes = 4 * HEAVY_PARAMS
    assert payload["config"]["param_bytes"] == pbytes

    for name, v in variants.items():
        steps, total = v["total_steps"], v["total_bytes"]
        assert steps >= 4 and v["samples_per_sec"] > 0, name
        if v["kind"] == "elastic":
            # One fused allreduce of exactly the parameters per round, a round every tau steps.
            assert steps % v["tau"] == 0, name
            assert total * v["tau"] == pbytes * steps, (name, total, steps)
            assert v["total_allreduce_calls"] * v["tau"] == steps, name
        elif v["kind"] == "horovod":
            # hvd.DistributedOptimizer: every gradient tensor, every step.
            assert total == pbytes * steps, (name, total, steps)
            assert v["total_allreduce_calls"] == HEAVY_TENSORS * steps, name
        else:
            assert total == 0 and v["total_allreduce_calls"] == 0, name
    assert variants["no-comm"]["ratio"] == 1.0
    bytes_target = payload["targets"][0]
    assert bytes_target["met"] is True, bytes_target
    # Async rounds really are waited on (or not) by the training thread, never negative.
    assert all(v["wait_ms_per_step"] >= 0 for v in variants.values())


def test_throughput_fp16_halves_the_bytes(tmp_path):
    # Also exercises the --polite-wait experiment, which must not change what is sent.
    out = tmp_path / "fp16.json"
    horovodrun([sys.executable, *TINY_THROUGHPUT, "--taus", "2", "--compression", "fp16",
                "--polite-wait", "--only", "hvd-sgd", "easgd-async-tau2", "--json", str(out)],
               timeout=240)
    variants = _by_name(json.loads(out.read_text()))
    assert set(variants) == {"no-comm", "hvd-sgd", "easgd-async-tau2"}
    easgd, hsgd = variants["easgd-async-tau2"], variants["hvd-sgd"]
    assert easgd["total_bytes"] * 2 == 2 * HEAVY_PARAMS * easgd["total_steps"]  # tau 2, fp16
    assert hsgd["total_bytes"] * 2 == 4 * HEAVY_PARAMS * hsgd["total_steps"]


def test_accuracy_runs_every_configuration_from_the_same_init(tmp_path):
    out, png = tmp_path / "accuracy.json", tmp_path / "accuracy.png"
    horovodrun([sys.executable, "benchmarks/accuracy.py", "--quick", "--taus", "1", "4",
                "--steps", "8", "--eval-every", "4", "--json", str(out), "--png", str(png)],
               timeout=240)
    payload = json.loads(out.read_text())
    results = {r["config"]: r for r in payload["results"]}
    assert set(results) == {"sgd", *(f"{m}-tau{t}" for m in ("easgd", "eamsgd", "downpour",
                                                            "average") for t in (1, 4))}
    for name, r in results.items():
        steps = [h["steps"] for h in r["history"]]
        assert steps == [0, 4, 8], name
        assert all(0.0 <= h["error"] <= 1.0 for h in r["history"]), name
        assert r["final_error"] == r["history"][-1]["error"]
    # A fixed seed gives every configuration the same initial center.
    initial = {r["history"][0]["error"] for r in results.values()}
    assert len(initial) == 1, initial
    assert payload["findings"] and png.stat().st_size > 10_000


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
