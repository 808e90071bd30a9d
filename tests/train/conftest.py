"""Fixtures shared by tests/train."""

from __future__ import annotations

import pytest

from tests.train.jobs import run_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """(output of the README's demo job, its run directory): one job for test_cli and
    test_console."""
    run_dir = tmp_path_factory.mktemp("demo") / "digits"
    return run_demo(run_dir), run_dir
