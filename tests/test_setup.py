"""launch/setup.sh: a second run changes nothing, and a missing prerequisite is one clear line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "launch" / "setup.sh"


def run_setup(env_extra, cwd=REPO):
    env = {**os.environ, **env_extra}
    return subprocess.run(["bash", str(SETUP)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.timeout(600)
def test_second_run_is_a_no_op():
    """The suite runs after setup (README/CI), so everything is in place: nothing is installed."""
    proc = run_setup({})
    assert proc.returncode == 0, proc.stderr
    assert "installing" not in proc.stdout and "building" not in proc.stdout, proc.stdout
    assert "ready in" in proc.stdout


@pytest.mark.timeout(60)
def test_unsuitable_python_is_refused_with_the_fix(tmp_path):
    fake = tmp_path / "python3.12"
    fake.write_text('#!/bin/sh\necho "Python 3.12.1"\nexit 1\n')
    fake.chmod(0o755)
    proc = run_setup({"PYTHON": str(fake)})
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1, proc.stderr  # one line, not a build log
    assert "3.8-3.11" in message[0] and "PYTHON" in message[0] and "pyenv install 3.11" in message[0]


@pytest.mark.timeout(60)
def test_missing_cmake_is_named_before_any_build(tmp_path):
    """A venv without Horovod needs a build: with no cmake on PATH it stops at once, saying so."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "launch" / "setup.sh").write_text(SETUP.read_text())
    (repo / "setup.py").write_text("")
    # A venv whose python "imports" torch but no Horovod, so the script reaches the build step.
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(
        '#!/bin/sh\n[ "$1" = - ] && { cat >/dev/null; echo "torch=2.0 torchvision=0.15"; exit 0; }\n'
        'exit 0\n')
    (bin_dir / "python").chmod(0o755)
    tools = tmp_path / "tools"  # PATH with bash's basics but no cmake
    tools.mkdir()
    for tool in ("dirname", "cat", "tr", "sed", "grep", "sha256sum", "cut",
                 "readlink", "ls", "head", "mkdir", "nproc"):
        path = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                              text=True).stdout.strip()
        if path:
            (tools / tool).symlink_to(path)
    proc = subprocess.run([shutil.which("bash"), str(repo / "launch" / "setup.sh")], cwd=repo,
                          env={"PATH": str(tools), "HOME": str(tmp_path),
                               "PYTHON": os.path.realpath(sys.executable)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cmake not found" in proc.stderr and "apt-get install cmake" in proc.stderr
