"""`hvd-easgd-plot RUN_DIR... [-o OUT.png] [--labels ...]`: the paper's figures for some runs.

Two panels, one line per run: the test error of the center variable and the training loss,
both against wall-clock training time (the paper's Figures 2-6 plot exactly these). Each run
directory must hold the trainer's `metrics.jsonl`; the legend shows the run's name from its
`config.yaml` (`run.name`, or the top-level `name`), else the directory's name.

`--x step|epoch|samples` plots against another axis, `--smooth K` smooths the training loss
with a running mean over K log events, `--log-loss` puts the loss on a log scale.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
DEFAULT_OUT = "hvd_easgd_curves.png"

ERROR_KEY = "center/test_error"
LOSS_KEY = "train/loss"

X_AXES = {
    "time": ("wall_time", "wall-clock training time"),
    "step": ("step", "local steps per worker"),
    "epoch": ("epoch", "epoch"),
    "samples": ("samples", "training samples (all workers)"),
}


class PlotError(Exception):
    """A run directory or an argument is unusable; the message says which and why."""


@dataclass
class Run:
    path: Path
    label: str
    records: List[dict] = field(default_factory=list)

    def series(self, key: str, x_key: str) -> Tuple[List[float], List[float]]:
        """(xs, ys) of the records that have both keys, in step order, the last record of each
        step winning (a resumed run may repeat steps)."""
        by_step: Dict[float, Tuple[float, float]] = {}
        order: List[float] = []
        for i, r in enumerate(self.records):
            if key not in r or x_key not in r:
                continue
            try:
                x, y = float(r[x_key]), float(r[key])
            except (TypeError, ValueError):
                continue
            s = r.get("step", i)
            if s not in by_step:
                order.append(s)
            by_step[s] = (x, y)
        pairs = [by_step[s] for s in sorted(order)]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _run_name_from_config(run_dir: Path) -> Optional[str]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # an unreadable config only costs the label
        return None
    if not isinstance(cfg, dict):
        return None
    run = cfg.get("run")
    if isinstance(run, dict) and run.get("name"):
        return str(run["name"])
    if cfg.get("name"):
        return str(cfg["name"])
    return None


def load_run(run_dir, label: Optional[str] = None) -> Run:
    """Read RUN_DIR/metrics.jsonl (and the name in RUN_DIR/config.yaml)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run directory")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PlotError(
            f"{run_dir}: missing {METRICS_FILE} (the JSON-lines metrics file that "
            f"hvd-easgd-train writes into its run directory); is this a run directory?")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):
                continue  # a torn last line of a run that is still writing, or that crashed
            raise PlotError(f"{path}, line {n}: not a JSON object: {line[:80]!r}") from None
        if isinstance(rec, dict):
            records.append(rec)
    if not records:
        raise PlotError(f"{path}: no records yet")
    name = label or _run_name_from_config(run_dir) or run_dir.resolve().name
    return Run(path=run_dir, label=name, records=records)


def _time_unit(max_seconds: float) -> Tuple[float, str]:
    if max_seconds >= 3 * 3600:
        return 3600.0, "h"
    if max_seconds >= 3 * 60:
        return 60.0, "min"
    return 1.0, "s"


def _smooth(ys: List[float], k: int) -> List[float]:
    if k <= 1:
        return ys
    out, window, total = [], [], 0.0
    for y in ys:
        if not math.isfinite(y):
            out.append(y)
            continue
        window.append(y)
        total += y
        if len(window) > k:
            total -= window.pop(0)
        out.append(total / len(window))
    return out


def make_figure(runs: Sequence[Run], *, x: str = "time", smooth: int = 1,
                log_loss: bool = False, title: Optional[str] = None):
    """A matplotlib Figure with two axes (center test error, training loss), one line per run
    in each (a run with no values for a panel gets an empty line, so the legend stays whole)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise PlotError(f"unknown x axis {x!r}; valid: {', '.join(X_AXES)}")
    x_key, x_name = X_AXES[x]
    scale, unit = 1.0, ""
    if x == "time":
        t_max = max((max(run.series(k, x_key)[0], default=0.0)
                     for run in runs for k in (ERROR_KEY, LOSS_KEY)), default=0.0)
        scale, unit = _time_unit(t_max)
    x_label = f"{x_name} ({unit})" if unit else x_name

    # Errors are fractions in [0, 1]; a run whose values exceed 1 logged percentages already.
    fig = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    ax_err, ax_loss = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        xs, errs = run.series(ERROR_KEY, x_key)
        finite = [e for e in errs if math.isfinite(e)]
        pct = 1.0 if finite and max(finite) > 1.0 else 100.0
        ax_err.plot([v / scale for v in xs], [e * pct for e in errs], color=color,
                    marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.6,
                    label=run.label)
        xs, losses = run.series(LOSS_KEY, x_key)
        label = run.label
        if any(not math.isfinite(v) for v in losses):
            label += " (diverged)"
        ax_loss.plot([v / scale for v in xs], _smooth(losses, smooth), color=color,
                     linewidth=1.3, label=label)

    ax_err.set_title("Test error of the center variable")
    ax_err.set_xlabel(x_label)
    ax_err.set_ylabel("test error (%)")
    ax_loss.set_title("Training loss" + (f" (running mean of {smooth} logs)" if smooth > 1
                                         else ""))
    ax_loss.set_xlabel(x_label)
    ax_loss.set_ylabel("training loss (cross-entropy)")
    if log_loss:
        ax_loss.set_yscale("log")
    for ax in (ax_err, ax_loss):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
    if title:
        fig.suptitle(title)
    return fig


def plot_runs(run_dirs: Sequence, out, *, labels: Optional[Sequence[str]] = None,
              x: str = "time", smooth: int = 1, log_loss: bool = False,
              title: Optional[str] = None) -> Path:
    """Load the runs, draw the figure and save it as PNG at `out`; returns the path."""
    if not run_dirs:
        raise PlotError("no run directories given")
    if labels and len(labels) != len(run_dirs):
        raise PlotError(f"--labels gave {len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    if not labels:
        names = [run.label for run in runs]
        # two runs of one recipe: tell them apart by their directories
        runs = [replace(run, label=f"{run.label} ({run.path.name})")
                if names.count(run.label) > 1 else run for run in runs]
    fig = make_figure(runs, x=x, smooth=smooth, log_loss=log_loss, title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd-easgd-plot",
        description="Plot the center's test error and the training loss of one or more runs "
                    "against wall-clock time (the paper's figures), to a PNG file.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories written by hvd-easgd-train (each holds metrics.jsonl)")
    p.add_argument("-o", "--out", default=DEFAULT_OUT,
                   help=f"output PNG file (default: {DEFAULT_OUT})")
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="legend labels, one per run, given after the run directories "
                        "(default: each run's name)")
    p.add_argument("--x", choices=sorted(X_AXES), default="time",
                   help="x axis (default: time, the paper's)")
    p.add_argument("--smooth", type=int, default=1, metavar="K",
                   help="running mean of the training loss over K log events (default: 1, raw)")
    p.add_argument("--log-loss", action="store_true", help="log scale for the training loss")
    p.add_argument("--title", help="a title over both panels")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    try:
        out = plot_runs(args.run_dirs, args.out, labels=args.labels, x=args.x,
                        smooth=args.smooth, log_loss=args.log_loss, title=args.title)
    except PlotError as e:
        print(f"hvd-easgd-plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
