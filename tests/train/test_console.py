"""The console of `hvd-easgd-train` under horovodrun (issue 13): complete lines, live progress,
readable numbers, a summary naming files that exist, train.log, --quiet / --log-every."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hvd_easgd.train.console import fmt_bytes, fmt_error, fmt_loss, fmt_seconds
from tests.train.jobs import DEMO, train_command, watch

PROGRESS = re.compile(r"\[hvd-easgd\] step (\d+)/(\d+) \(\d+%\) epoch [\d.]+ \| loss \S+ \| lr \S+ \| "
                      r"[\d,]+ samples/s \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")
LONG_FLOAT = re.compile(r"\d\.\d{6,}")


def train(tmp_path, *extra):
    run_dir = tmp_path / "run"
    proc = watch([*train_command(), "--config", DEMO, "--run-dir", str(run_dir),
                  "--set", "train.epochs=2", "--set", "train.eval_every=0",
                  "--set", "checkpoint.every=0", *extra], np=2, timeout=240)
    return proc, run_dir


@pytest.fixture(scope="module")
def normal(demo):
    """The README's demo job (tests/train/conftest.py), a progress line every half second."""
    return demo


def ours(proc):
    """The lines hvd-easgd printed, as horovodrun shows them."""
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if "[hvd-easgd]" in ln]


def test_every_line_is_complete_and_from_rank_0(normal):
    proc, _ = normal
    assert "\r" not in proc.stdout + proc.stderr, "no carriage returns under horovodrun"
    lines = ours(proc)
    assert lines, "the trainer printed nothing"
    for line in lines:
        assert line.startswith("[0]<stderr>:[hvd-easgd] "), f"glued or not rank 0: {line!r}"
        assert line.count("[hvd-easgd]") == 1, f"two messages glued on one line: {line!r}"


def assert_live(arrivals) -> None:
    """Progress lines reached the reader of horovodrun's output while the job ran, spread over
    the training, not dumped at the end: each arrived with the job still running, in step order,
    and the first one (for a step before the last) well before the run's summary."""
    progress = [(t, int(m.group(1)), int(m.group(2)), alive)
                for t, ln, alive in arrivals if (m := PROGRESS.search(ln))]
    assert progress, "no progress line"
    total = progress[0][2]
    assert any(step < total for _, step, _, _ in progress), "a progress line before the end"
    assert [step for _, step, _, _ in progress] == sorted(step for _, step, _, _ in progress)
    assert all(alive for *_, alive in progress), "a progress line after the job had exited"
    summary = next(t for t, ln, _ in arrivals if "done:" in ln)
    first = progress[0][0]
    assert summary - first >= 1.0 and progress[-1][0] - first >= 0.25, (
        f"progress lines arrived from {first:.2f} s to {progress[-1][0]:.2f} s, the summary at "
        f"{summary:.2f} s: printed at the end, not as training went")


def test_progress_lines_appear_while_training(normal):
    proc, _ = normal
    assert_live(proc.arrivals)


def test_numbers_are_rounded_for_reading(normal):
    proc, _ = normal
    for line in ours(proc):
        assert not LONG_FLOAT.search(line), f"unrounded number: {line!r}"
    errors = [ln for ln in ours(proc) if "center test error" in ln]
    assert errors and all(re.search(r"center test error \d+\.\d\d%", ln) for ln in errors)


def test_summary_names_files_that_exist(normal):
    proc, run_dir = normal
    text = "\n".join(ours(proc))
    assert re.search(r"done: \d+ steps, 30\.00 epochs, [\d,]+ samples in \d+:\d\d:\d\d", text)
    assert re.search(r"center test error \d+\.\d\d% final, \d+\.\d\d% best \(step \d+\)", text)
    assert re.search(r"communication +\d+ rounds, [\d.]+ [kMG]?B sent per worker, [\d.]+% of", text)
    outputs = next(ln for ln in ours(proc) if "outputs" in ln)
    center = re.search(r"center (\S+?),", outputs).group(1)
    ckpts = re.search(r"checkpoints (\S+) \((\d+)\)", outputs)
    log = re.search(r"log (\S+)$", outputs).group(1)
    assert Path(center).is_file() and Path(log).is_file()
    assert Path(ckpts.group(1)).is_dir() and len(list(Path(ckpts.group(1)).glob("*.pt"))) == int(ckpts.group(2))
    assert f"hvd-easgd-plot {run_dir}" in text


def test_train_log_holds_rank_0s_console(normal):
    proc, run_dir = normal
    logged = (run_dir / "train.log").read_text().splitlines()
    shown = [ln.split(":", 1)[1] for ln in ours(proc)]
    assert logged == shown


def test_quiet_prints_only_the_summary(tmp_path):
    proc, run_dir = train(tmp_path, "--quiet")
    lines = ours(proc)
    assert not any(PROGRESS.search(ln) or "center test error" in ln and "final" not in ln
                   for ln in lines)
    assert any("done:" in ln for ln in lines)
    # train.log still holds the whole story
    assert any(PROGRESS.search(ln) for ln in (run_dir / "train.log").read_text().splitlines())


def test_formatting():
    assert fmt_error(0.02777777777777779) == "2.78%"
    assert fmt_loss(0.09341182708740234) == "0.09341" and fmt_loss(1234.5678) == "1235"
    assert fmt_seconds(3725.4) == "1:02:05" and fmt_seconds(None) == "-"
    assert fmt_bytes(99_912_345) == "99.9 MB" and fmt_bytes(512) == "512 B"


def test_warnings_reach_train_log(tmp_path):
    import warnings

    from hvd_easgd.train.console import Console

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        console = Console(tmp_path, active=True, total_steps=10, initial_step=0, every=15,
                          quiet=True, bar=False, name="t")
        warnings.warn("round 3 skipped", RuntimeWarning)
        console.close()
    assert "[hvd-easgd] RuntimeWarning: round 3 skipped" in (tmp_path / "train.log").read_text()


def test_an_elastic_console_names_its_rank_and_counts_from_the_jobs_start(tmp_path):
    """After an elastic reset the console is reopened, maybe in another process: its lines name
    the rank it prints for (horovodrun's [N] is the rank the process started with) and the
    elapsed time and ETA count from the job's start, not from the reset."""
    import io
    import time

    from hvd_easgd.train.console import Console

    stream = io.StringIO()
    console = Console(tmp_path, active=True, total_steps=100, initial_step=0, every=0, quiet=False,
                      bar=False, name="t", stream=stream, started=time.time() - 125, label="rank 0")
    console.progress(50, 1.0, {"train/loss": 1.0, "lr": 0.1, "samples_per_sec": 10.0})
    console.close()
    line = stream.getvalue().strip()
    assert line.startswith("[hvd-easgd rank 0] step 50/100 (50%) epoch 1.00 | loss 1 |"), line
    assert line.endswith("| elapsed 0:02:05 | ETA 0:02:05"), line
    assert (tmp_path / "train.log").read_text().strip() == line
