"""The launch/ scripts: syntax, and the exact command each builds (DRY_RUN=1)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = ["run_local.sh", "run_multinode.sh", "slurm.sbatch", "cluster_env.sh"]
DIGITS = "recipes/demo/digits.yaml"

# Variables the scripts read: a developer's own settings must not leak into the tests.
_SCRIPT_VARS = {
    "CONFIG", "NP", "SLOTS", "HOSTS", "CONTROLLER", "TRAIN", "HOROVODRUN", "HOROVODRUN_ARGS",
    "NETWORK_INTERFACE", "CLUSTER_ENV", "LAUNCH_DIR", "DRY_RUN", "HOSTS_FILE", "DISCOVERY",
    "MIN_NP", "MAX_NP", "ELASTIC_TIMEOUT", "PYTHON", "HVD_EASGD_TUNE", "HVD_EASGD_DEFAULTED",
    "BLACKLIST_COOLDOWN",
}


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in _SCRIPT_VARS and not k.startswith(("SLURM_", "HOROVOD_", "NCCL_"))}
    env.update(extra)
    return env


def _run(script, *args, check=True, **env):
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=str(REPO),
                          env=_env(**env), capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _dry(script, *args, **env):
    return _run(script, *args, DRY_RUN="1", **env).stdout.strip()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_strict(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(path, os.X_OK)
    assert script in (LAUNCH / "README.md").read_text()


def test_run_local_commands():
    assert _dry("run_local.sh") == (
        f"horovodrun -np 2 -H localhost:2 --gloo hvd-easgd-train --config {DIGITS}")
    assert _dry("run_local.sh", "recipes/cifar10/x.yaml", "--set", "data.root=/data/c 10",
                NP="4", HOROVODRUN_ARGS="--start-timeout 120", CONTROLLER="mpi") == (
        "horovodrun -np 4 -H localhost:4 --mpi --start-timeout 120 hvd-easgd-train "
        "--config recipes/cifar10/x.yaml --set 'data.root=/data/c 10'")
    # A first argument that is a flag goes to the trainer; CONFIG and TRAIN from the environment.
    assert _dry("run_local.sh", "--resume", CONFIG="r.yaml", CONTROLLER="auto",
                TRAIN="python -m hvd_easgd.train") == (
        "horovodrun -np 2 -H localhost:2 python -m hvd_easgd.train --config r.yaml --resume")
    bad = _run("run_local.sh", check=False, DRY_RUN="1", NP="two")
    assert bad.returncode == 2 and "NP must be a positive integer" in bad.stderr


def test_run_multinode_commands():
    assert _dry("run_multinode.sh", HOSTS="gpu01,gpu02") == (
        f"horovodrun -np 8 -H gpu01:4,gpu02:4 --gloo hvd-easgd-train --config {DIGITS}")
    assert _dry("run_multinode.sh", "recipes/imagenet/x.yaml", "--set", "train.epochs=2",
                HOSTS="a:2, b", SLOTS="3", NP="4", NETWORK_INTERFACE="ib0") == (
        "horovodrun -np 4 -H a:2,b:3 --gloo --network-interface ib0 hvd-easgd-train "
        "--config recipes/imagenet/x.yaml --set train.epochs=2")
    missing = _run("run_multinode.sh", check=False, DRY_RUN="1")
    assert missing.returncode == 2 and "set HOSTS" in missing.stderr
    too_many = _run("run_multinode.sh", check=False, DRY_RUN="1", HOSTS="a:2", NP="3")
    assert too_many.returncode == 2 and "do not fit" in too_many.stderr


def test_slurm_builds_the_host_list_from_the_allocation(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "scontrol.log"
    scontrol = fake / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                        '[ "$1 $2" = "show hostnames" ] || exit 1\necho host1\necho host2\n')
    scontrol.chmod(0o755)
    path = f"{fake}{os.pathsep}{os.environ['PATH']}"
    slurm = dict(SLURM_JOB_NODELIST="host[1-2]", SLURM_NTASKS_PER_NODE="4",
                 SLURM_SUBMIT_DIR=str(REPO), PATH=path)
    assert _dry("slurm.sbatch", **slurm) == (
        f"horovodrun -np 8 -H host1:4,host2:4 --gloo hvd-easgd-train --config {DIGITS}")
    assert log.read_text().split("\n")[0] == "show hostnames host[1-2]"
    # Without --ntasks-per-node: the count in SLURM_TASKS_PER_NODE; trainer args pass through.
    slurm2 = dict(slurm, SLURM_TASKS_PER_NODE="2(x2)", NETWORK_INTERFACE="ib0")
    del slurm2["SLURM_NTASKS_PER_NODE"]
    assert _dry("slurm.sbatch", "recipes/cifar10/x.yaml", "--resume", **slurm2) == (
        "horovodrun -np 4 -H host1:2,host2:2 --gloo --network-interface ib0 hvd-easgd-train "
        "--config recipes/cifar10/x.yaml --resume")
    outside = _run("slurm.sbatch", check=False, DRY_RUN="1")
    assert outside.returncode == 2 and "submit this with sbatch" in outside.stderr


def test_cluster_env():
    exports = _run("cluster_env.sh", NETWORK_INTERFACE="ib0", NCCL_DEBUG="INFO",
                   SLOTS="2").stdout.splitlines()
    for line in ["export HOROVOD_GPU_OPERATIONS=NCCL", "export NCCL_SOCKET_IFNAME=ib0",
                 "export HOROVOD_GLOO_IFACE=ib0", "export HOROVOD_CACHE_CAPACITY=1024",
                 "export NCCL_DEBUG=INFO"]:  # a value set before wins
        assert line in exports
    assert any(line.startswith("export OMP_NUM_THREADS=") for line in exports)
    # hvd-easgd's default cycle, marked as a default (a recipe's horovod.cycle_time_ms replaces
    # it without a warning); a value exported before is the user's: not marked
    assert {"export HOROVOD_CYCLE_TIME=20", "export HVD_EASGD_DEFAULTED=HOROVOD_CYCLE_TIME"} <= set(exports)
    exports = _run("cluster_env.sh", HOROVOD_CYCLE_TIME="5").stdout.splitlines()
    assert "export HOROVOD_CYCLE_TIME=5" in exports
    assert not any("HVD_EASGD_DEFAULTED" in line for line in exports)
    assert _dry("cluster_env.sh", "horovodrun", "-np", "2", "x y") == "horovodrun -np 2 'x y'"
    # Sourced into a shell, it sets the variables and leaves the shell's options alone.
    proc = subprocess.run(
        ["bash", "-c", "source launch/cluster_env.sh; echo \"$- $HOROVOD_GPU_OPERATIONS\"; "
                       "declare -F _hvd_default || echo clean"],
        cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    opts, value = proc.stdout.splitlines()[0].split()
    assert "e" not in opts and "u" not in opts and value == "NCCL"
    assert proc.stdout.splitlines()[1] == "clean"


ELASTIC = "recipes/demo/digits_elastic.yaml"


def _elastic_dry(*args, **env):
    import sys

    env.setdefault("PYTHON", sys.executable)
    return _dry("run_elastic.sh", *args, **env)


def test_run_elastic_builds_an_elastic_horovodrun(tmp_path):
    cmd = _elastic_dry(ELASTIC)
    assert cmd.startswith("horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script ")
    assert f"{LAUNCH}/discover_hosts.sh" in cmd and "--network-interface lo" in cmd
    assert cmd.endswith(f"hvd-easgd-train --config {ELASTIC} --set elastic.enabled=true")
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode1:4\nnode2:4\n")
    cmd = _elastic_dry(ELASTIC, "--set", "train.epochs=2", HOSTS_FILE=str(hosts), MAX_NP="8",
                       MIN_NP="4")
    assert "-np 8 --min-np 4 --max-np 8" in cmd and "--network-interface" not in cmd
    assert cmd.endswith("--set elastic.enabled=true --set train.epochs=2")


def test_discovery_script_prints_the_hosts_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n\nlocalhost:1\n 127.0.0.1:1 \n")
    out = _run("discover_hosts.sh", HOSTS_FILE=str(hosts)).stdout.split()
    assert out == ["localhost:1", "127.0.0.1:1"]
    missing = _run("discover_hosts.sh", check=False, HOSTS_FILE=str(tmp_path / "nope"))
    assert missing.returncode != 0 and "HOSTS_FILE" in missing.stderr


def test_run_elastic_refuses_bad_worker_counts():
    proc = _run("run_elastic.sh", ELASTIC, check=False, DRY_RUN="1", MIN_NP="3", MAX_NP="2",
                PYTHON=__import__("sys").executable)
    assert proc.returncode == 2 and "MIN_NP <= NP <= MAX_NP" in proc.stderr


def test_run_elastic_lets_a_failed_host_come_back_after_a_cooldown(monkeypatch):
    """Horovod blacklists a failed worker's host for good unless given a cooldown: the launcher
    gives one by default, and the installed horovodrun accepts every flag it builds."""
    import shlex
    import sys

    cmd = _elastic_dry(ELASTIC)
    assert " --blacklist-cooldown-range 10 300 " in cmd
    assert " --blacklist-cooldown-range 1 3 " in _elastic_dry(ELASTIC, BLACKLIST_COOLDOWN="1 3")
    assert "--blacklist-cooldown-range" not in _elastic_dry(ELASTIC, BLACKLIST_COOLDOWN="off")
    for bad in ("5", "0 3", "9 4", "1 4000", "a b"):
        proc = _run("run_elastic.sh", ELASTIC, check=False, DRY_RUN="1", BLACKLIST_COOLDOWN=bad,
                    PYTHON=sys.executable)
        assert proc.returncode == 2 and "BLACKLIST_COOLDOWN must be" in proc.stderr, bad
    from horovod.runner.launch import parse_args

    monkeypatch.setattr(sys, "argv", shlex.split(cmd))
    args = parse_args()
    assert args.cooldown_range == [10, 300] and args.min_num_proc == 1 and args.max_num_proc == 2
    assert args.command[0] == "hvd-easgd-train"
