"""What a person reads while `hvd-easgd-train` runs: progress, evaluations, a summary.

Under ``horovodrun`` a worker's stdout and stderr are pipes that Horovod reads line by line and
prefixes with ``[rank]<stream>:``, so a tqdm bar (carriage returns, no newline) shows nothing
until the end in a terminal and fragments in a log file. :class:`Console` therefore draws a tqdm
bar only when rank 0's stderr really is a terminal (the trainer started without horovodrun) and
otherwise prints one complete line every ``log.console_seconds`` (and at every evaluation) with
step/total, epoch, loss, learning rate, samples/s, elapsed time and ETA. Numbers are rounded
for reading (errors in percent with two decimals, losses to four significant digits, times in
h:mm:ss); full precision stays in ``metrics.jsonl`` and TensorBoard. Everything rank 0 prints
here also goes to ``RUN_DIR/train.log``. Other ranks print nothing.

Under Horovod Elastic the process that is rank 0 can change at a reset, while horovodrun keeps
labelling a process's lines with the rank it was started with (``[1]<stderr>:``); the console
then names the rank it prints for (``[hvd-easgd rank 0]``, ``label``), and its elapsed time
counts from the job's start (``started``), not from the reset that reopened it.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

PREFIX = "[hvd-easgd]"
LOG_FILE = "train.log"


def fmt_error(value: Optional[float]) -> str:
    """A test error (a fraction) as a percentage with two decimals."""
    return "-" if value is None else f"{100.0 * value:.2f}%"


def fmt_loss(value: Optional[float]) -> str:
    """A loss to four significant digits."""
    return "-" if value is None else f"{value:.4g}"


def fmt_seconds(seconds: Optional[float]) -> str:
    """Seconds as h:mm:ss (rounded to whole seconds)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n} B"  # pragma: no cover


def log_on_rank0(msg: str, rank: int) -> None:
    """A note to stderr before the console is open (rank 0 only)."""
    if rank == 0:
        print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def warn_on_rank0(msg: str, rank: int) -> None:
    """A UserWarning said once for the job (by rank 0): every worker reaches the same warning."""
    if rank == 0:
        warnings.warn(msg, stacklevel=3)


class Console:
    """Rank 0's console and ``train.log``; inactive (silent) on other ranks.

    ``quiet``: no progress or evaluation lines, only warnings, the summary and errors.
    ``every``: seconds between progress lines when stderr is not a terminal.
    ``started`` (``time.time()``, default now) and ``initial_step``: where the elapsed time and
    the ETA count from. ``label``: said after the prefix of every line (``[hvd-easgd LABEL]``).
    """

    def __init__(self, run_dir: Path, *, active: bool, total_steps: int, initial_step: int,
                 every: float, quiet: bool, bar: bool, name: str,
                 stream: Optional[TextIO] = None, started: Optional[float] = None,
                 label: str = "") -> None:
        self.active, self.quiet, self.every = active, quiet, float(every)
        self.total, self.name = total_steps, name
        self.prefix = f"{PREFIX[:-1]} {label}]" if label else PREFIX
        self.stream = stream or sys.stderr
        self._log = open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8") if active else None
        self._bar = None
        self._started = time.time() if started is None else float(started)
        self._start_step = initial_step
        self._last_line = time.monotonic()
        self._shown = None
        if active:  # warnings on rank 0 (non-finite rounds, resume notes) go to train.log too
            self._shown = warnings.showwarning
            warnings.showwarning = self._show_warning
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        if active and bar and interactive and not quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=name, unit="step",
                             dynamic_ncols=True, file=self.stream)

    def say(self, text: str, *, always: bool = False) -> None:
        """One complete line (``always``: even when quiet)."""
        if not self.active:
            return
        line = f"{self.prefix} {text}"
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        if self.quiet and not always:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def progress(self, step: int, epoch: float, metrics: Dict[str, Any], force: bool = False) -> None:
        """A progress line, at most every ``every`` seconds (always with ``force``)."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=fmt_loss(metrics.get("train/loss")),
                                  lr=f"{metrics.get('lr', 0):.3g}", refresh=False)
            return
        now = time.monotonic()
        if not force and now - self._last_line < self.every:
            return
        self._last_line = now
        done = step - self._start_step
        elapsed = max(0.0, time.time() - self._started)
        eta = elapsed / done * (self.total - step) if done > 0 else None
        rate = metrics.get("samples_per_sec")
        self.say(
            f"step {step}/{self.total} ({100.0 * step / max(1, self.total):.0f}%) "
            f"epoch {epoch:.2f} | loss {fmt_loss(metrics.get('train/loss'))} | "
            f"lr {metrics.get('lr', 0):.3g} | "
            f"{'-' if rate is None else f'{rate:,.0f}'} samples/s | "
            f"elapsed {fmt_seconds(elapsed)} | ETA {fmt_seconds(eta)}")

    def evaluation(self, step: int, metrics: Dict[str, float]) -> None:
        parts = [f"center test error {fmt_error(metrics.get('center/test_error'))} "
                 f"(loss {fmt_loss(metrics.get('center/test_loss'))})"]
        if "local/test_error" in metrics:
            parts.append(f"local {fmt_error(metrics['local/test_error'])} "
                         f"(loss {fmt_loss(metrics.get('local/test_loss'))})")
        self.say(f"step {step}/{self.total}: " + " | ".join(parts))

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self._log is not None:
            self._log.write(f"{self.prefix} {category.__name__}: {message}\n")
            self._log.flush()
        assert self._shown is not None
        self._shown(message, category, filename, lineno, file, line)

    def close(self) -> None:
        if self._shown is not None:
            warnings.showwarning = self._shown
            self._shown = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._log is not None:
            self._log.close()
            self._log = None


def summary_lines(summary: Dict[str, Any], best: Optional[tuple], run_dir: Path,
                  checkpoints: int, tensorboard: bool) -> list:
    """The end-of-run summary, one string per line."""
    rate = summary["samples"] / summary["wall_time"] if summary.get("wall_time") else None
    lines = [f"done: {summary['step']} steps, {summary['epoch']:.2f} epochs, "
             f"{summary['samples']:,} samples in {fmt_seconds(summary.get('wall_time'))} of "
             f"training ({'-' if rate is None else f'{rate:,.0f}'} samples/s, "
             f"{summary['world_size']} worker(s))"]
    center = f"  center test error {fmt_error(summary.get('center/test_error'))} final"
    if best is not None:
        center += f", {fmt_error(best[0])} best (step {best[1]})"
    if summary.get("local/test_error") is not None:
        center += f"; local model {fmt_error(summary['local/test_error'])}"
    lines.append(center)
    if summary.get("rounds") is not None:
        share = summary.get("comm_share")
        lines.append(f"  communication     {summary['rounds']} rounds, "
                     f"{fmt_bytes(summary.get('bytes_communicated'))} sent per worker, "
                     f"{'-' if share is None else f'{100 * share:.1f}%'} of training time waiting"
                     + (f" (Horovod cycle {summary['horovod_cycle_time_ms']:g} ms)"
                        if summary.get("horovod_cycle_time_ms") is not None else "")
                     + (f", {summary['skipped_rounds']} round(s) skipped (NaN/inf)"
                        if summary.get("skipped_rounds") else ""))
    outputs = []
    if summary.get("center_path"):
        outputs.append(f"center {summary['center_path']}")
    if checkpoints:
        outputs.append(f"checkpoints {Path(run_dir) / 'checkpoints'} ({checkpoints})")
    if tensorboard:
        outputs.append(f"TensorBoard {run_dir}")
    outputs.append(f"log {Path(run_dir) / LOG_FILE}")
    lines.append("  outputs           " + ", ".join(outputs))
    lines.append(f"  plot it           hvd-easgd-plot {run_dir}")
    return lines
