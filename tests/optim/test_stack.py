"""The installed stack: Horovod built with PyTorch and Gloo, and a real 2-process allreduce."""

import subprocess
import sys

import pytest

from tests.hvdrun import HOROVODRUN, run_workers


def test_check_build_lists_pytorch_and_gloo():
    out = subprocess.run([HOROVODRUN, "--check-build"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert any("[X] PyTorch" in line for line in lines), out.stdout
    # Gloo appears twice: as a controller and as a tensor-operations backend.
    assert sum("[X] Gloo" in line for line in lines) == 2, out.stdout


def test_stack_imports():
    subprocess.run([sys.executable, "-c", "import hvd_easgd, torchvision, horovod.torch"], check=True)


@pytest.mark.timeout(180)
def test_two_process_gloo_allreduce(tmp_path):
    results = run_workers("stack_allreduce.py", tmp_path, np=2)
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["size"] == 2
        # ranks hold [r+1, 10*(r+1), ...]: the sum is 1+2 = 3 times the pattern, the mean 1.5x
        assert result["sum"] == [3.0 * 10**i for i in range(4)]
        assert result["mean"] == [1.5 * 10**i for i in range(4)]
        assert result["gathered"] == [0, 1]
