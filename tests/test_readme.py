"""The README's first lines are the two fresh-machine commands, and CI runs the second."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands():
    lines = [l.strip() for l in (REPO / "README.md").read_text().splitlines()[1:6] if l.strip()]
    return lines[0], lines[1]


def test_readme_starts_with_main_and_test_commands():
    main, tests = readme_commands()
    assert main.startswith("bash launch/setup.sh && ") and "horovodrun -np 2" in main
    assert "hvd-easgd-train --config recipes/demo/digits.yaml" in main
    assert (REPO / "recipes/demo/digits.yaml").exists()
    assert tests.startswith("bash launch/setup.sh && ") and "pytest tests" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci = [l.strip() for l in (REPO / ".ci/run").read_text().splitlines()]
    assert tests in ci, f".ci/run must run the README's test command: {tests}"
