"""benchmarks/profile_round.py: its classifier on a synthetic py-spy raw file, and one short
real profile of a tiny model (skipped without py-spy). Wall time is never asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hvdrun import REPO, worker_env

sys.path.insert(0, str(REPO))
from benchmarks import profile_round as pr  # noqa: E402

MAIN = "thread (100): MainThread;0x1 (libc.so.6);<module> (throughput.py:456);main (throughput.py:390)"
TIMED = MAIN + ";measure (throughput.py:183);measure.<locals>.step (throughput.py:165)"
STEP = TIMED + (";Optimizer.profile_hook_step.<locals>.wrapper (torch/optim/optimizer.py:549)"
                ";ElasticOptimizer.step (hvd_easgd/optim/optimizer.py:218)")
SYNC = STEP + ";Rounds.run (hvd_easgd/optim/rounds.py:55);Rounds.sync (hvd_easgd/optim/rounds.py:68)"
APPLY = SYNC + ";Rounds.apply (hvd_easgd/optim/rounds.py:130)"
WAIT = SYNC + ";Communicator.wait (hvd_easgd/optim/exchange.py:126);wait_for_handle (hvd_easgd/optim/exchange.py:92)"
EXCHANGE = ("thread (200): hvd-easgd-exchange;0x2 (libc.so.6);thread_run (libpython3.11.so.1.0)"
            ";Thread.run (threading.py:982);BackgroundExchange.submit.<locals>.wait "
            "(hvd_easgd/optim/exchange.py:170);Communicator.wait (hvd_easgd/optim/exchange.py:126)"
            ";wait_for_handle (hvd_easgd/optim/exchange.py:92)")
HOROVOD = ("thread (300);0x3 (libc.so.6);BackgroundThreadLoop (operations.cc:694)"
           ";RunLoopOnce (operations.cc:832)")
SYNTHETIC = "\n".join([
    TIMED + ";Module._wrapped_call_impl (torch/nn/modules/module.py:1775)"
            ";Linear.forward (torch/nn/modules/linear.py:134);addmm (libtorch_cpu.so) 20",
    TIMED + ";Tensor.backward (torch/_tensor.py:623);_engine_run_backward "
            "(torch/autograd/graph.py:841);torch::autograd::Engine::execute (libtorch.so) 40",
    # The local step runs inside ElasticOptimizer.step: the innermost anchor (sgd.py) wins.
    SYNC + ";Optimizer.profile_hook_step.<locals>.wrapper (torch/optim/optimizer.py:549)"
           ";SGD.step (torch/optim/sgd.py:130);_single_tensor_sgd (torch/optim/sgd.py:380) 10",
    SYNC + ";Rounds._start (hvd_easgd/optim/rounds.py:176);Rounds._seal "
           "(hvd_easgd/optim/rounds.py:183);CenterState.seal (hvd_easgd/optim/center.py:98);sub "
           "(libtorch_cpu.so) 4",
    APPLY + ";CenterState.round_is_finite (hvd_easgd/optim/center.py:110) 2",
    APPLY + ";ElasticRule.apply (hvd_easgd/optim/rules.py:95) 3",
    APPLY + ";FlatGroup.scatter_add (hvd_easgd/optim/flat.py:52) 3",
    WAIT + ";time_sleep (libpython3.11.so.1.0);clock_nanosleep (libc.so.6) 6",
    WAIT + ";poll (horovod/torch/mpi_ops.py:1266) 2",
    # Warm-up steps (measure's line 177 is outside the timed loop 181-184).
    MAIN + ";measure (throughput.py:177);measure.<locals>.step (throughput.py:165) 10",
    EXCHANGE + ";time_sleep (libpython3.11.so.1.0);clock_nanosleep (libc.so.6) 9",
    EXCHANGE + ";poll (horovod/torch/mpi_ops.py:1266) 1",
    HOROVOD + ";nanosleep (libc.so.6) 3",
    HOROVOD + ";horovod::common::GlooAllreduce::Execute (gloo_operations.cc:80) 1",
    "not a sample line",
]) + "\n"
WINDOW = ("throughput.py", 181, 184)


def percents(result: dict, thread: str) -> dict:
    return {c: v["percent"] for c, v in result["threads"][thread]["categories"].items()}


def test_classifier_on_a_synthetic_raw_file(tmp_path):
    raw = tmp_path / "synthetic.raw"
    raw.write_text(SYNTHETIC)
    result = pr.analyse(raw, WINDOW)
    assert result["samples"] == 114
    main = result["threads"]["training thread (MainThread)"]
    assert main["samples"] == 100
    assert percents(result, "training thread (MainThread)") == {
        "backward": 40.0, "forward + loss": 20.0, "local optimizer step": 10.0,
        pr.OUTSIDE: 10.0, "round: wait (sleeping between polls)": 6.0,
        "round: seal (d = x - c)": 4.0, "round: rule (center update)": 3.0,
        "round: pull (scatter_add)": 3.0, "round: finiteness check": 2.0,
        "round: wait (polling (hvd.poll))": 2.0,
    }
    assert percents(result, "exchange thread (hvd-easgd-exchange)") == {
        "sleeping between polls": 90.0, "polling (hvd.poll)": 10.0}
    horovod = [t for t in result["threads"] if t.startswith("Horovod background")]
    assert len(horovod) == 1
    assert percents(result, horovod[0]) == {"sleeping (cycle time)": 75.0,
                                            "allreduce (Gloo)": 25.0}
    # Without the timed window, the warm-up samples are classified like any others.
    assert pr.OUTSIDE not in percents(pr.analyse(raw), "training thread (MainThread)")
    assert pr.python_tids(pr.load_raw(raw)) == [100, 200]
    text = pr.render(result)
    assert "| training thread (MainThread) | backward | 40 | 40.0 |" in text


def test_timed_window_and_worker_detection():
    script, first, last = pr.timed_window()
    assert script == "throughput.py" and first < last
    source = (REPO / "benchmarks" / "throughput.py").read_text().splitlines()
    assert "stopwatch()" in source[first - 1]
    assert pr.is_worker(["/x/.venv/bin/python", "/r/benchmarks/throughput.py", "--only"],
                        "throughput.py")
    assert not pr.is_worker(["/bin/sh", "-c", "env X=1 python benchmarks/throughput.py"],
                            "throughput.py")
    assert not pr.is_worker(["/x/python", "/x/horovodrun", "python", "throughput.py"],
                            "throughput.py")


PY_SPY = Path(sys.executable).with_name("py-spy")


@pytest.mark.skipif(not (PY_SPY.exists() or shutil.which("py-spy")), reason="needs py-spy")
def test_real_profile_of_a_tiny_model(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/profile_round.py", "--variants", "easgd-async-tau16",
         "--hidden", "16", "--batch", "4", "--warmup", "16", "--duration", "2", "--settle", "0",
         "--py-spy", str(PY_SPY if PY_SPY.exists() else shutil.which("py-spy")),
         "--out-dir", str(tmp_path), "--json", str(out)],
        cwd=str(REPO), env=worker_env(), capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 and "Permission denied" in proc.stdout + proc.stderr:
        pytest.skip("py-spy may not attach to processes here")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["rank"] == 0 and result["samples"] > 0
    main = result["threads"]["training thread (MainThread)"]["categories"]
    assert {"forward + loss", "backward", "local optimizer step"} <= set(main)
    # Sampling started after the warm-up: at most a stray sample outside the timed loop.
    assert main.get(pr.OUTSIDE, {"percent": 0})["percent"] < 5
    assert "| training thread (MainThread) |" in proc.stdout
    # The job was stopped: none of its workers is left running.
    for pid in [result["worker_pid"], *result["peer_pids"]]:
        assert not pr.cmdline(pid), pid
