"""`hvd-easgd-sweep` (also `python -m hvd_easgd.train.sweep`): a recipe over learning rates and seeds.

    hvd-easgd-sweep recipes/cifar10/eamsgd_p4_tau16.yaml            # print the jobs
    hvd-easgd-sweep recipes/cifar10/eamsgd_p4_tau16.yaml --run      # run them, one after another
    hvd-easgd-sweep recipes/cifar10/eamsgd_p4_tau16.yaml --report   # the table of finished runs

The grid is the recipe's `sweep:` section (`lrs`, `seeds`; checked with the rest of the config,
see hvd_easgd/train/config.py), or `--lrs` / `--seeds`. As in the paper, every run of a sweep starts
from the same initialisation: `train.init_seed` is fixed (the recipe's `train.init_seed`, else
its `train.seed`) while `train.seed`, which sets the data order and dropout, takes each seed.
Each job is one `horovodrun ... hvd-easgd-train --config RECIPE --set optimizer.lr=LR --set
train.seed=SEED --set train.init_seed=INIT` writing to `OUT/lr<LR>_seed<SEED>/` (OUT defaults
to `runs/sweeps/<recipe name>`).

The report reads each run's `metrics.jsonl` (the trainer's evaluations of the center) and picks
the best run as the paper does: the smallest center test error reached. It prints a table per
run and per learning rate (mean and spread over seeds) and writes `OUT/sweep.json`. Note that
this selects on the test set, like the paper; `benchmarks/protocol.py` shows
the stricter protocol (choose on a validation split, report the test error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hvd_easgd.train.config import ConfigError, DictConfig, load_config

SUMMARY_FILE = "sweep.json"


class SweepError(ValueError):
    """Bad input to the sweep; the message says how to fix it."""


@dataclass(frozen=True)
class Job:
    lr: float
    seed: int
    run_dir: Path
    command: List[str]

    @property
    def name(self) -> str:
        return self.run_dir.name


# ------------------------------------------------------------------------------ the plan


def load_recipe(recipe: str, overrides: Sequence[str]) -> DictConfig:
    if not Path(recipe).is_file():
        raise SweepError(f"recipe not found: {recipe}; pass the path of a YAML recipe, e.g. "
                         f"recipes/demo/digits_sweep.yaml (ls recipes/ lists them)")
    try:
        return load_config(recipe, overrides)
    except ConfigError as e:
        raise SweepError(f"{e}") from None


def grid(cfg: DictConfig, recipe: str, lrs: Optional[Sequence[float]],
         seeds: Optional[Sequence[int]]) -> tuple:
    """(learning rates, seeds): the command line's, else the recipe's `sweep:` section."""
    lrs = list(lrs) if lrs else list(cfg.sweep.lrs)
    seeds = list(seeds) if seeds else list(cfg.sweep.seeds)
    if not lrs:
        raise SweepError(
            f"no learning-rate grid: {recipe} has no sweep.lrs and no --lrs was given; add "
            f"`sweep: {{lrs: [0.01, 0.03, 0.1]}}` to the recipe or pass --lrs 0.01 0.03 0.1")
    if any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise SweepError(f"--lrs must be distinct learning rates > 0, got {lrs}")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds must be distinct seeds >= 0 (at least one), got {seeds}")
    return lrs, seeds


def default_launcher() -> str:
    sibling = Path(sys.executable).with_name("horovodrun")
    return str(sibling) if sibling.exists() else "horovodrun"


def default_train_command() -> List[str]:
    sibling = Path(sys.executable).with_name("hvd-easgd-train")
    if sibling.exists():
        return [str(sibling)]
    found = shutil.which("hvd-easgd-train")
    return [found] if found else [sys.executable, "-m", "hvd_easgd.train"]


def plan(args: argparse.Namespace) -> tuple:
    """(config, out dir, jobs) of a sweep; every check happens here, before any job runs."""
    cfg = load_recipe(args.recipe, args.overrides)
    lrs, seeds = grid(cfg, args.recipe, args.lrs, args.seeds)
    np = args.np or cfg.launch.np
    if np is None:
        raise SweepError(f"{args.recipe} has no launch.np: pass --np N (workers per run)")
    hosts = args.hosts or (cfg.launch.hosts if np == cfg.launch.np else None) or f"localhost:{np}"
    init_seed = cfg.train.init_seed if cfg.train.init_seed is not None else cfg.train.seed
    out = Path(args.out or Path("runs") / "sweeps" / (cfg.name or Path(args.recipe).stem))
    launcher = shlex.split(args.launcher) if args.launcher else [default_launcher()]
    jobs = []
    for lr in lrs:
        for seed in seeds:
            run_dir = out / f"lr{lr:g}_seed{seed}"
            sets = [*args.overrides, f"optimizer.lr={lr!r}", f"train.seed={seed}",
                    f"train.init_seed={init_seed}"]
            command = [*launcher, "-np", str(np), "-H", hosts, *default_train_command(),
                       "--config", args.recipe, "--run-dir", str(run_dir), "--quiet",
                       *(x for s in sets for x in ("--set", s))]
            jobs.append(Job(float(lr), int(seed), run_dir, command))
    return cfg, out, jobs


# ------------------------------------------------------------------------------ running


def finished(run_dir: Path) -> bool:
    """A run that got to its end: the trainer exports center.pt last (checkpoint.export_center)."""
    return (run_dir / "center.pt").exists()


def run_jobs(jobs: Sequence[Job], log=print) -> Dict[str, int]:
    """Run the jobs one after another (never two at once); skip the finished ones. A failing
    job (e.g. exit 3: training diverged) is recorded and the sweep goes on."""
    codes: Dict[str, int] = {}
    for i, job in enumerate(jobs, 1):
        if finished(job.run_dir):
            log(f"[{i}/{len(jobs)}] {job.name}: finished earlier, skipped")
            codes[job.name] = 0
            continue
        log(f"[{i}/{len(jobs)}] {job.name}: {shlex.join(job.command)}")
        job.run_dir.mkdir(parents=True, exist_ok=True)
        with open(job.run_dir / "sweep_job.log", "w") as out:
            codes[job.name] = subprocess.run(job.command, stdout=out, stderr=subprocess.STDOUT).returncode
        if codes[job.name] != 0:
            log(f"    exit {codes[job.name]}; see {job.run_dir / 'sweep_job.log'}")
    return codes


# ------------------------------------------------------------------------------ the report


def read_run(job: Job) -> Dict[str, Any]:
    """Best (lowest) and final center test error of one run, from its metrics.jsonl."""
    from hvd_easgd.train.metrics import METRICS_FILE, read_metrics

    row: Dict[str, Any] = {"lr": job.lr, "seed": job.seed, "run_dir": str(job.run_dir),
                           "finished": finished(job.run_dir)}
    path = job.run_dir / METRICS_FILE
    evals = [r for r in read_metrics(path) if "center/test_error" in r] if path.exists() else []
    evals = [r for r in evals if math.isfinite(r["center/test_error"])]
    if not evals:
        return dict(row, status="no evaluation")
    best = min(evals, key=lambda r: (r["center/test_error"], r["step"]))
    return dict(row, status="finished" if row["finished"] else "incomplete",
                best_error=best["center/test_error"], best_step=best["step"],
                best_wall_time=best["wall_time"], final_error=evals[-1]["center/test_error"],
                steps=evals[-1]["step"], wall_time=evals[-1]["wall_time"])


def summarise(jobs: Sequence[Job]) -> Dict[str, Any]:
    runs = [read_run(j) for j in jobs]
    done = [r for r in runs if "best_error" in r]
    best = min(done, key=lambda r: (r["best_error"], r["lr"], r["seed"])) if done else None
    per_lr = []
    for lr in dict.fromkeys(j.lr for j in jobs):
        errs = [r["best_error"] for r in done if r["lr"] == lr]
        mean = sum(errs) / len(errs) if errs else None
        sd = (math.sqrt(sum((e - mean) ** 2 for e in errs) / (len(errs) - 1))
              if len(errs) > 1 else None)
        per_lr.append({"lr": lr, "runs": len(errs), "mean_best_error": mean, "sd": sd,
                       "min_best_error": min(errs) if errs else None})
    return {"runs": runs, "per_lr": per_lr, "best": best}


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render(summary: Dict[str, Any], name: str) -> str:
    best = summary["best"]
    lines = [f"## sweep {name}: center test error (best = smallest reached)", "",
             "| lr | seed | best error | at step | at wall_time (s) | final error | status |",
             "|---:|---:|---:|---:|---:|---:|:---|"]
    for r in summary["runs"]:
        mark = " **<- best**" if best is not None and r is best else ""
        lines.append(f"| {r['lr']:g} | {r['seed']} | {pct(r.get('best_error'))} | "
                     f"{r.get('best_step', '-')} | {r.get('best_wall_time', 0):.1f} | "
                     f"{pct(r.get('final_error'))} | {r['status']}{mark} |")
    lines += ["", "| lr | runs | mean best error | sd | min |", "|---:|---:|---:|---:|---:|"]
    for p in summary["per_lr"]:
        lines.append(f"| {p['lr']:g} | {p['runs']} | {pct(p['mean_best_error'])} | "
                     f"{pct(p['sd'])} | {pct(p['min_best_error'])} |")
    lines.append("")
    lines.append("best run: " + (f"lr {best['lr']:g}, seed {best['seed']}: "
                                 f"{pct(best['best_error'])} at step {best['best_step']} "
                                 f"({best['run_dir']})" if best else "none finished an evaluation"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd-easgd-sweep", description="Expand a recipe over learning rates and seeds "
        "(same initialisation, other data orders); print or run the horovodrun jobs; report "
        "the best run by the smallest center test error reached.")
    p.add_argument("recipe", help="the YAML recipe (its sweep: section gives the grid)")
    p.add_argument("--lrs", type=float, nargs="+", help="learning rates (default: sweep.lrs)")
    p.add_argument("--seeds", type=int, nargs="+", help="data-order seeds (default: sweep.seeds)")
    p.add_argument("--np", type=int, help="workers per run (default: launch.np)")
    p.add_argument("-H", "--hosts", help="horovodrun -H (default: launch.hosts, or localhost:NP)")
    p.add_argument("--out", help="sweep directory (default: runs/sweeps/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set train.max_time=600")
    p.add_argument("--launcher", help="the launcher and its options, e.g. 'horovodrun --gloo' "
                   "(default: horovodrun)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the jobs (one at a time), then report")
    mode.add_argument("--report", action="store_true", help="only the report of finished runs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, out, jobs = plan(args)
    except SweepError as e:
        print(f"hvd-easgd-sweep: error: {e}", file=sys.stderr)
        return 2
    if not (args.run or args.report):
        for job in jobs:
            print(shlex.join(job.command))
        return 0
    if args.run:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        run_jobs(jobs, log=lambda m: print(m, file=sys.stderr, flush=True))
    summary = summarise(jobs)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(render(summary, cfg.name or Path(args.recipe).stem))
    return 0 if summary["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
