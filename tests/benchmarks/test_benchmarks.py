"""Smoke tests of the benchmarks run under Horovod, with tiny settings, in real
``horovodrun -np 2`` jobs: every script runs end to end and reports every variant, and one real
property is checked exactly, the communication volume. The bytes Horovod is handed (counted by
wrapping Horovod's own allreduce functions) must be the parameter bytes once per ``tau`` steps
for EASGD (half with fp16) and the gradient bytes every step for ``hvd.DistributedOptimizer``.
Wall-clock numbers are never asserted.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.hvdrun import horovodrun

HIDDEN = 16  # the "heavy" MLP shrunk to a few hundred kB
HEAVY_PARAMS = (3072 * HIDDEN + HIDDEN) + (HIDDEN * 3072 + 3072) + (3072 * 10 + 10)
HEAVY_TENSORS = 6  # three Linear layers: weight + bias each
DIGITS_NET_PARAMS = 151_306


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    """One job for every case: fp32 and fp16 wires, and the --polite-wait experiment (the
    default wait is run by tests/benchmarks/test_scale_model.py's baselines job)."""
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    horovodrun([sys.executable, "benchmarks/throughput.py", "--model", "heavy", "--hidden",
                str(HIDDEN), "--batch", "4", "--steps", "4", "--warmup", "1", "--reps", "1",
                "--taus", "1", "4", "--baseline-tau", "4", "--compression", "none", "fp16",
                "--polite-wait", "--json", str(out)], timeout=300)
    payload = json.loads(out.read_text())
    return payload, {v["name"]: v for v in payload["variants"]}


def test_throughput_reports_every_variant_and_exact_bytes(throughput):
    payload, variants = throughput
    fp32 = {"hvd-sgd", "downpour-sync-tau4", "average-sync-tau4",
            *(f"easgd-{mode}-tau{t}" for mode in ("sync", "async") for t in (1, 4))}
    assert set(variants) == {"no-comm", *fp32, *(f"{name}+fp16" for name in fp32)}
    assert payload["config"]["parameters"] == HEAVY_PARAMS
    assert payload["config"]["param_bytes"] == 4 * HEAVY_PARAMS
    for name, v in variants.items():
        steps, total = v["total_steps"], v["total_bytes"]
        wire = (2 if name.endswith("+fp16") else 4) * HEAVY_PARAMS
        assert steps >= 4 and v["samples_per_sec"] > 0, name
        if v["kind"] == "elastic":
            # One fused allreduce of exactly the parameters per round, a round every tau steps.
            assert steps % v["tau"] == 0, name
            assert total * v["tau"] == wire * steps, (name, total, steps)
            assert v["total_allreduce_calls"] * v["tau"] == steps, name
        elif v["kind"] == "horovod":
            # hvd.DistributedOptimizer: every gradient tensor, every step.
            assert total == wire * steps, (name, total, steps)
            assert v["total_allreduce_calls"] == HEAVY_TENSORS * steps, name
        else:
            assert total == 0 and v["total_allreduce_calls"] == 0, name
    assert variants["no-comm"]["ratio"] == 1.0
    assert payload["targets"][0]["met"] is True, payload["targets"][0]


def test_throughput_times_the_training_threads_waits(throughput):
    # A variant that never communicates never waits; every synchronous one (Horovod's SGD
    # every step, sync EASGD every round) blocks the training thread in `synchronize`.
    _, variants = throughput
    assert variants["no-comm"]["comm_share"] == 0 and variants["no-comm"]["wait_ms_per_step"] == 0
    blocking = [n for n in variants if "-sync-" in n or n.startswith("hvd-sgd")]
    assert len(blocking) == 10
    assert all(variants[n]["comm_share"] > 0 for n in blocking), {
        n: variants[n]["comm_share"] for n in blocking}


#: the paper's methods, sync SGD and DiLoCo's outer step over local SGD (MDOWNPOUR and DiLoCo
#: with AdamW run in tests/benchmarks/test_protocol.py's job)
METHODS_RUN = ("easgd", "eamsgd", "downpour", "average", "sgd", "diloco-sgd")


def test_accuracy_runs_every_configuration_from_the_same_init(tmp_path):
    out, png = tmp_path / "accuracy.json", tmp_path / "accuracy.png"
    horovodrun([sys.executable, "benchmarks/accuracy.py", "--methods", *METHODS_RUN, "--taus",
                "1", "4", "--steps", "8", "--eval-every", "4", "--json", str(out), "--png",
                str(png)], timeout=300)
    payload = json.loads(out.read_text())
    results = {r["config"]: r for r in payload["results"]}
    assert set(results) == {"sgd", *(f"{m}-tau{t}" for m in METHODS_RUN if m != "sgd"
                                     for t in (1, 4))}
    for name, r in results.items():
        assert [h["steps"] for h in r["history"]] == [0, 4, 8], name
        assert all(0.0 <= h["error"] <= 1.0 for h in r["history"]), name
        assert r["final_error"] == r["final_errors"][0] == r["history"][-1]["error"], name
        # each worker hands Horovod the parameters once per round (sgd: not an elastic method);
        # a sync EASGD round starts when the step before it ends: the 9th is on the wire at tau 1
        if r["tau"] is not None:
            rounds = 8 // r["tau"] + (r["tau"] == 1 and r["method"] in ("easgd", "eamsgd"))
            assert r["bytes_sent"] == rounds * 4 * DIGITS_NET_PARAMS, name
    # A fixed seed gives every configuration the same initial center.
    initial = {r["history"][0]["error"] for r in results.values()}
    assert len(initial) == 1, initial
    assert payload["findings"] and png.stat().st_size > 10_000


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
