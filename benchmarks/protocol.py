"""The paper's protocol at small scale: learning-rate grids, seeds, error bars (digits).

A plain program: it starts one ``horovodrun`` job per worker count itself::

    python benchmarks/protocol.py --json runs/bench/protocol.json \
        --png benchmarks/figures/protocol.png           # the full protocol, about an hour here
    python benchmarks/protocol.py --quick --json q.json --png q.png   # the CI variant

For each method (EASGD, EAMSGD, DOWNPOUR, MDOWNPOUR, averaging, Horovod's sync SGD, and DiLoCo
where hvd_easgd has ``method="diloco"``) and tau in {1, 4, 16, 64}: three learning rates a
factor 3 apart (``LR_GRID``) run once, extended by another factor 3 while the best rate is at
an edge of what was tried (up to ``GRID_EXTEND`` times), and the rate with the lowest error on
a validation split carved from the training data is chosen (the test set chooses nothing);
then two more seeds at that rate. Every run starts from the same initialisation; a seed sets
the data order and dropout. Two tasks: plain digits (2 workers) and ``digits-hard`` (2 and 4
workers): 300 training images with 40 % of their labels replaced by another class, so that the
test error stays far above one test image and the methods' ways of combining noisy workers can
separate. Output: mean and spread over seeds of the final center test error and of the time
(and steps) to a target error, a table per task and worker count, one verdict per paper claim
(differences count only beyond two standard errors over seeds), a JSON and one PNG per task
(center test error against training wall-clock, a panel per tau, a row per worker count, bands
= min..max over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd
import torch

from benchmarks.common import environment, format_table, job_env, setup_worker, write_json
from benchmarks.digits import (BETA, DEFAULT_LR, MASTER_MOMENTUM, METHODS, MOMENTUM,
                               WEIGHT_DECAY, Config, RunPlan, build_configs, train_run)

#: methods in the order of the tables
ALL_METHODS = tuple(METHODS)

PROTOCOL_METHODS = ("easgd", "eamsgd", "downpour", "mdownpour", "average", "sgd")
#: Rates tried first: a factor GRID_STEP apart around the rate an earlier grid search chose on
#: plain digits (DEFAULT_LR); ascending, so that a tie on the validation split goes to the
#: smaller rate.
GRID_STEP = 3.0
LR_GRID = {m: (DEFAULT_LR[m] / GRID_STEP, DEFAULT_LR[m], DEFAULT_LR[m] * GRID_STEP)
           for m in METHODS}
#: While the best rate is the largest (smallest) tried, try one a factor GRID_STEP beyond it,
#: at most this many times: a best rate at the edge of its grid says the grid was too narrow.
GRID_EXTEND = 2
#: The model's initialisation, the same for every run (the paper: "same initialization").
INIT_SEED = 1234
#: The validation split: this share of the training set, stratified, carved once (fixed seed).
VALIDATION_FRACTION = 0.2
#: Selection score: mean validation error over this many last evaluations (less noisy than one).
SELECT_LAST = 3
#: A difference counts as beyond the noise when larger than this many standard errors.
NOISE_SE = 2.0
#: The full protocol's budget: steps per worker (the same for every run), evaluation period,
#: batch per worker. Sized so that the whole protocol fits in about an hour on 2 shared cores.
PROTOCOL_STEPS, PROTOCOL_EVAL_EVERY, PROTOCOL_BATCH = 400, 20, 32


@dataclass(frozen=True)
class Task:
    """A classification task built from scikit-learn's digits (no download)."""

    name: str
    train_size: Optional[int]  # training examples kept after the validation split (None: all)
    label_noise: float  # share of training labels replaced by another class, drawn at random
    target: float  # the test error whose time to reach is reported
    about: str


TASKS = {
    "digits": Task("digits", None, 0.0, 0.05,
                   "plain digits: 1149 training, 288 validation, 360 test images"),
    "digits-hard": Task(
        "digits-hard", 300, 0.4, 0.15,
        "300 training images (150 per worker at 2 workers, 75 at 4), 40 % of their labels "
        "replaced by a random other class; validation and test labels clean"),
}


@dataclass(frozen=True)
class ProtocolSettings:
    steps: int  # steps per worker, every run
    eval_every: int
    batch: int
    seeds: int
    taus: Tuple[int, ...]
    methods: Tuple[str, ...]
    tasks: Tuple[str, ...]
    grid_size: int  # rates of LR_GRID tried first (the first ones)
    grid_extend: int  # rates added at most, a factor GRID_STEP beyond the edge that won


def protocol_methods() -> Tuple[str, ...]:
    """PROTOCOL_METHODS, plus DiLoCo when hvd_easgd offers ``method="diloco"``."""
    from hvd_easgd.optim import OUTER_METHODS

    return PROTOCOL_METHODS + (("diloco",) if "diloco" in OUTER_METHODS else ())


def with_defaults(args: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments with the protocol's defaults filled in (full or --quick); what it cannot
    run is refused with the flag to change."""
    quick = args.quick
    args = argparse.Namespace(**{**vars(args), **{
        "methods": args.methods or list(protocol_methods()),
        "taus": args.taus or ([1, 16] if quick else [1, 4, 16, 64]),
        "workers": args.workers or ([2] if quick else [2, 4]),
        "seeds": args.seeds or (2 if quick else 3),
        "tasks": args.tasks or (["digits-hard"] if quick else list(TASKS)),
        "more_workers_tasks": (["digits-hard"] if args.more_workers_tasks is None
                               else args.more_workers_tasks),
        "steps": args.steps or (24 if quick else PROTOCOL_STEPS),
        "eval_every": args.eval_every or (8 if quick else PROTOCOL_EVAL_EVERY)}})
    if "diloco" in args.methods and "diloco" not in protocol_methods():
        p.error("--methods diloco: this hvd_easgd has no method='diloco'")
    if any(w < 1 for w in args.workers) or any(t < 1 for t in args.taus) or args.seeds < 1 \
            or args.steps < 1 or args.eval_every < 1 or args.batch < 1:
        p.error("--workers, --taus, --seeds, --steps, --eval-every and --batch must be >= 1")
    if args.steps < args.eval_every * SELECT_LAST:
        p.error(f"--steps must allow at least {SELECT_LAST} evaluations "
                f"(--steps >= {SELECT_LAST} x --eval-every)")
    return args


def tasks_for(args: argparse.Namespace, workers: int) -> List[str]:
    """Every task at the smallest worker count; at the others, --more-workers-tasks only."""
    if workers == min(args.workers):
        return list(args.tasks)
    return [t for t in args.tasks if t in args.more_workers_tasks]


def protocol_settings(args: argparse.Namespace) -> ProtocolSettings:
    return ProtocolSettings(
        steps=args.steps, eval_every=args.eval_every, batch=args.batch, seeds=args.seeds,
        taus=tuple(args.taus), methods=tuple(args.methods), tasks=tuple(args.tasks),
        grid_size=2 if args.quick else 3, grid_extend=1 if args.quick else GRID_EXTEND)


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class TaskData:
    train: Any
    val_loader: Any
    test_loader: Any


def split_task(task: Task) -> Tuple[Any, Any, Any]:
    """(train, validation, test) TensorDatasets: validation carved from digits' training set
    (stratified, fixed seed), then the task's subsample and label noise on the training part."""
    from sklearn.model_selection import train_test_split
    from torch.utils.data import TensorDataset

    from hvd_easgd.train.data import build_datasets

    bundle = build_datasets("digits")
    x, y = bundle.train.tensors
    fit, val = train_test_split(range(len(y)), test_size=VALIDATION_FRACTION,
                                random_state=0, stratify=y.numpy())
    if task.train_size is not None:
        fit, _ = train_test_split(fit, train_size=task.train_size, random_state=0,
                                  stratify=y[fit].numpy())
    fit, val = torch.as_tensor(sorted(fit)), torch.as_tensor(sorted(val))
    labels = y[fit].clone()
    if task.label_noise > 0:
        gen = torch.Generator().manual_seed(0)
        flip = torch.rand(len(labels), generator=gen) < task.label_noise
        shift = torch.randint(1, bundle.num_classes, (len(labels),), generator=gen)
        labels[flip] = (labels[flip] + shift[flip]) % bundle.num_classes
    return TensorDataset(x[fit], labels), TensorDataset(x[val], y[val]), bundle.test


def task_data(task: Task) -> TaskData:
    from hvd_easgd.train.data import eval_loader

    rank, size = hvd.rank(), hvd.size()
    train, val, test = split_task(task)
    return TaskData(train, eval_loader(val, 256, rank=rank, world_size=size),
                    eval_loader(test, 256, rank=rank, world_size=size))


def protocol_run(config: Config, lr: float, seed: int, data: TaskData,
                 settings: ProtocolSettings) -> Dict[str, Any]:
    """One run: the same initial model as every other run; ``seed`` sets data order and
    dropout. History of (training seconds, steps, validation error, test error)."""
    plan = RunPlan(config.method, config.tau, lr, init_seed=INIT_SEED, data_seed=seed,
                   dropout_seed=1000 * seed + 1, steps=settings.steps,
                   eval_every=settings.eval_every, batch=settings.batch)
    run = train_run(plan, data.train, (data.val_loader, data.test_loader))
    return {"method": config.method, "tau": config.tau, "lr": lr, "seed": seed,
            "diverged": run["diverged"],
            "history": [{"seconds": h["seconds"], "steps": h["steps"], "val_error": h["errors"][0],
                         "test_error": h["errors"][1]} for h in run["history"]]}


# ------------------------------------------------------------------------------ grid + seeds


def selection_score(run: Dict[str, Any]) -> float:
    """Mean validation error over the last SELECT_LAST evaluations (inf if it diverged)."""
    if run["diverged"]:
        return math.inf
    return sum(h["val_error"] for h in run["history"][-SELECT_LAST:]) / SELECT_LAST


def best_of(tried: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the lowest validation score; of equal scores, the smallest rate."""
    return min(sorted(tried, key=lambda r: r["lr"]), key=selection_score)


def next_rate(tried: List[Dict[str, Any]]) -> Optional[float]:
    """A rate a factor GRID_STEP beyond the edge of ``tried`` when the best run sits at that
    edge and did not diverge; None when the best is inside the grid."""
    best, rates = best_of(tried), sorted(r["lr"] for r in tried)
    if len(rates) < 2 or best["diverged"]:
        return None
    if best["lr"] == rates[-1]:
        return rates[-1] * GRID_STEP
    if best["lr"] == rates[0]:
        return rates[0] / GRID_STEP
    return None


def tune_and_repeat(config: Config, data: TaskData, settings: ProtocolSettings,
                    log) -> List[Dict[str, Any]]:
    """The grid at seed 0 (extended while its best rate is at an edge), the rate with the
    lowest validation score, then seeds 1.. there. Every worker makes the same choice: the
    errors are reduced over all workers."""
    run_at = lambda lr: dict(protocol_run(config, lr, 0, data, settings), phase="grid")  # noqa: E731
    tried = [run_at(lr) for lr in LR_GRID[config.method][:settings.grid_size]]
    for _ in range(settings.grid_extend):
        lr = next_rate(tried)
        if lr is None:
            break
        tried.append(run_at(lr))
    best, rates = best_of(tried), sorted(r["lr"] for r in tried)
    tried = [dict(r, chosen=r is best, val_score=selection_score(r),
                  grid_edge=r["lr"] in (rates[0], rates[-1])) for r in tried]
    best = next(r for r in tried if r["chosen"])
    scores = ", ".join(f"{r['lr']:.3g}: {r['val_score']:.1%}"
                       for r in sorted(tried, key=lambda r: r["lr"]))
    log(f"  {config.name:>16}: validation {scores}"
        f" -> lr {best['lr']:.3g}{' (edge)' if best['grid_edge'] else ''}")
    repeats = [dict(protocol_run(config, best["lr"], seed, data, settings), phase="seed",
                    chosen=True) for seed in range(1, settings.seeds)]
    return tried + repeats


def protocol_worker(args: argparse.Namespace) -> None:
    """One horovodrun job (one worker count): every task, configuration, rate and seed."""
    hvd.init()
    setup_worker(args.threads)
    settings = protocol_settings(args)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if hvd.rank() == 0 else (
        lambda *a: None)
    runs, started = [], time.perf_counter()
    for name in tasks_for(args, hvd.size()):
        data = task_data(TASKS[name])
        log(f"{name}, {hvd.size()} workers: {len(data.train)} training images")
        for config in build_configs(settings.methods, settings.taus):
            for run in tune_and_repeat(config, data, settings, log):
                runs.append(dict(run, task=name, workers=hvd.size()))
    if hvd.rank() == 0:
        write_json(args.json, {"workers": hvd.size(), "runs": runs,
                               "job_seconds": time.perf_counter() - started})


# ------------------------------------------------------------------------------ the driver


def protocol_driver(args: argparse.Namespace) -> Dict[str, Any]:
    """Start one horovodrun job per worker count (one after the other), then summarise."""
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        runs, seconds = payload["runs"], payload["job_seconds"]
        args = argparse.Namespace(**{**vars(args), **{key: payload["config"][key] for key in (
            "workers", "tasks", "taus", "methods", "seeds", "steps", "eval_every", "batch",
            "quick", "more_workers_tasks")}})
    else:
        runs, seconds = [], {}
        with tempfile.TemporaryDirectory() as tmp:
            for workers in args.workers:
                out = Path(tmp) / f"protocol_w{workers}.json"
                launch_protocol_job(args, workers, out)
                job = json.loads(out.read_text())
                runs += job["runs"]
                seconds[str(workers)] = job["job_seconds"]
    payload = protocol_payload(args, runs, seconds)
    print(render_protocol(payload))
    write_json(args.json, payload)
    if args.png:
        for task in args.tasks:
            plot_protocol(payload, task, protocol_png(args.png, task))
    return payload


def protocol_png(path: str, task: str) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}_{task}{p.suffix or '.png'}"))


def launch_protocol_job(args: argparse.Namespace, workers: int, out: Path) -> None:
    runner = Path(sys.executable).with_name("horovodrun")
    cmd = [str(runner) if runner.exists() else "horovodrun", "-np", str(workers),
           "-H", f"localhost:{workers}", "--gloo", "--start-timeout", "120",
           sys.executable, str(Path(__file__).resolve()), "--protocol-worker", "--json", str(out), "--steps", str(args.steps),
           "--eval-every", str(args.eval_every), "--batch", str(args.batch),
           "--seeds", str(args.seeds), "--threads", str(args.threads),
           "--taus", *map(str, args.taus), "--methods", *args.methods,
           "--workers", *map(str, args.workers), "--tasks", *tasks_for(args, workers),
           "--more-workers-tasks", *args.more_workers_tasks] + (["--quick"] if args.quick else [])
    # A small model whose rounds come as often as every step: Horovod's 1 ms cycle, not the
    # 20 ms hvd-easgd picks for large models with rare rounds (hvd_easgd.optim's tuning).
    env = job_env(args.threads, {"HOROVOD_CYCLE_TIME": os.environ.get("HOROVOD_CYCLE_TIME", "1")})
    repo = str(Path(__file__).resolve().parents[1])
    print(f"[protocol] {workers} workers: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, cwd=repo)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"the {workers}-worker protocol job failed (exit {proc.returncode})")


def protocol_payload(args: argparse.Namespace, runs: List[Dict[str, Any]],
                     seconds: Dict[str, float]) -> Dict[str, Any]:
    settings = protocol_settings(args)
    summary = summarise(runs)
    return {
        "benchmark": "accuracy-protocol",
        "config": {**vars(settings), "workers": list(args.workers),
                   "more_workers_tasks": list(args.more_workers_tasks), "lr_grid": {
            m: LR_GRID[m][:settings.grid_size] for m in settings.methods},
            "grid_step": GRID_STEP,
            "init_seed": INIT_SEED, "validation_fraction": VALIDATION_FRACTION,
            "select_last": SELECT_LAST, "noise_se": NOISE_SE, "beta": BETA,
            "weight_decay": WEIGHT_DECAY, "momentum": MOMENTUM,
            "master_momentum": MASTER_MOMENTUM, "quick": bool(args.quick)},
        "tasks": {n: vars(TASKS[n]) for n in settings.tasks},
        "environment": environment(), "job_seconds": seconds,
        "summary": summary, "findings": protocol_findings(summary, settings, args.workers),
        "runs": runs,
    }


# ------------------------------------------------------------------------------ statistics


def mean_sd(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def reach(run: Dict[str, Any], target: float) -> Tuple[Optional[float], Optional[int]]:
    """(training seconds, steps) of the first evaluation at or under ``target`` test error."""
    for h in run["history"]:
        if h["test_error"] <= target:
            return h["seconds"], h["steps"]
    return None, None


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (task, workers, method, tau): the chosen rate's runs, mean and spread over seeds."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["workers"], r["method"], r["tau"]), []).append(r)
    rows = []
    for (task, workers, method, tau), group in groups.items():
        chosen = [r for r in group if r.get("chosen")]
        target = TASKS[task].target
        finals = [r["history"][-1]["test_error"] for r in chosen]
        hits = [reach(r, target) for r in chosen]
        times = [t for t, _ in hits if t is not None]
        steps = [s for _, s in hits if s is not None]
        rows.append({
            "task": task, "workers": workers, "method": method, "tau": tau,
            "lr": chosen[0]["lr"], "seeds": len(chosen), "target": target,
            "grid": {str(r["lr"]): r["val_score"] for r in group if r.get("phase") == "grid"},
            "grid_edge": any(r.get("grid_edge") for r in chosen if r.get("phase") == "grid"),
            "final_test": finals, "final_mean": mean_sd(finals)[0], "final_sd": mean_sd(finals)[1],
            "best_mean": mean_sd([min(h["test_error"] for h in r["history"]) for r in chosen])[0],
            "times": [t for t, _ in hits], "time_mean": mean_sd(times)[0],
            "time_sd": mean_sd(times)[1], "reached": len(times),
            "steps_mean": mean_sd(steps)[0], "steps_list": [s for _, s in hits],
            "diverged": sum(bool(r["diverged"]) for r in chosen),
            "seconds_mean": mean_sd([r["history"][-1]["seconds"] for r in chosen])[0],
        })
    return rows


# ------------------------------------------------------------------------------ the claims


def compare(a: Sequence[Optional[float]], b: Sequence[Optional[float]],
            floor: float = 0.0) -> str:
    """'lower', 'higher' or 'noise': is ``a`` below ``b`` beyond the noise? A difference of
    the means counts when it exceeds NOISE_SE standard errors (over seeds) and ``floor``.
    ``None`` is a run that never got there: a side that always got there beats a side that
    never did; any other difference in how many got there counts as noise."""
    ra, rb = [v for v in a if v is not None], [v for v in b if v is not None]
    if len(ra) != len(rb):
        if min(len(ra), len(rb)) > 0:
            return "noise"
        return "lower" if len(ra) > len(rb) else "higher"
    if not ra:
        return "noise"
    (ma, sa), (mb, sb) = mean_sd(ra), mean_sd(rb)
    diff = ma - mb
    if abs(diff) <= max(NOISE_SE * math.sqrt(sa ** 2 / len(ra) + sb ** 2 / len(rb)), floor):
        return "noise"
    return "lower" if diff < 0 else "higher"


def verdict_of(outcomes: Sequence[str], want: str) -> str:
    """One verdict from several comparisons: any contrary beyond the noise -> did not hold."""
    if not outcomes:
        return "not measured"
    if any(o not in (want, "noise") for o in outcomes):
        return "did not hold"
    return "held" if all(o == want for o in outcomes) else "inside the noise"


def stability_at(rows: Dict[tuple, Dict[str, Any]], task: str, workers: int, lo: int, hi: int,
                 floor: float) -> Tuple[str, List[str]]:
    """The stability claim between tau ``lo`` and ``hi``: (verdict, one note per method)."""
    parts, outcomes = [], []
    for method, want in (("easgd", "stable"), ("eamsgd", "stable"), ("downpour", "degrades"),
                         ("mdownpour", "degrades")):
        a, b = rows.get((task, workers, method, hi)), rows.get((task, workers, method, lo))
        if a is None or b is None:
            continue
        got = compare(a["final_test"], b["final_test"], floor)  # "higher": worse at tau hi
        if want == "stable":
            outcomes.append("held" if got != "higher" else "contrary")
        else:
            outcomes.append({"higher": "held", "noise": "noise"}.get(got, "contrary"))
        parts.append(f"{method} {b['final_mean']:.1%} (tau {lo}) -> {a['final_mean']:.1%} "
                     f"(tau {hi}){' [' + str(a['diverged']) + ' diverged]' if a['diverged'] else ''}")
    return verdict_of(outcomes, "held"), parts


def stability_findings(rows: Dict[tuple, Dict[str, Any]], task: str, workers: int,
                       taus: Sequence[int], floor: float) -> Dict[str, Any]:
    """EASGD/EAMSGD stable as tau grows (final error at a larger tau not worse beyond the
    noise than at the smallest) while DOWNPOUR/MDOWNPOUR degrade (worse beyond the noise).
    The verdict is the largest tau's; the detail gives every tau's."""
    lo, verdicts, parts = min(taus), {}, []
    for hi in sorted(t for t in taus if t != lo):
        verdicts[hi], notes = stability_at(rows, task, workers, lo, hi, floor)
        if hi == max(taus):
            parts = notes
    per_tau = ", ".join(f"tau {lo} -> {hi}: {v}" for hi, v in verdicts.items())
    return {"claim": "EASGD/EAMSGD stable as tau grows while DOWNPOUR degrades",
            "task": task, "workers": workers, "per_tau": {str(k): v for k, v in verdicts.items()},
            "verdict": verdicts.get(max(taus), "not measured"),
            "detail": f"{per_tau}. " + "; ".join(parts)}


def fastest_findings(rows: Dict[tuple, Dict[str, Any]], task: str, workers: int,
                     taus: Sequence[int]) -> Dict[str, Any]:
    """EAMSGD reaches the target error sooner (training wall-clock) than every other method
    at the same tau and than sync SGD, at every tau."""
    outcomes, parts = [], []
    for tau in taus:
        mine = rows.get((task, workers, "eamsgd", tau))
        others = [r for (t, w, m, ta), r in rows.items()
                  if t == task and w == workers and m != "eamsgd" and ta in (tau, None)]
        if mine is None or not others:
            continue
        got = [compare(mine["times"], o["times"]) for o in others]
        here = verdict_of(got, "lower")
        outcomes.append({"held": "lower", "inside the noise": "noise"}.get(here, "higher"))
        fastest = min(others, key=lambda r: r["time_mean"] if r["reached"] else math.inf)
        parts.append(f"tau {tau}: {here} (eamsgd {fmt_time(mine)}, fastest other "
                     f"{fastest['method']} {fmt_time(fastest)})")
    return {"claim": "EAMSGD reaches the target error fastest", "task": task,
            "workers": workers, "verdict": verdict_of(outcomes, "lower"),
            "detail": "; ".join(parts)}


def workers_findings(rows: Dict[tuple, Dict[str, Any]], task: str,
                     workers: Sequence[int]) -> Dict[str, Any]:
    """More workers reach the target sooner: every (method, tau) at the most workers against
    the fewest, in training wall-clock (and, machine-independent, in steps per worker)."""
    few, many = min(workers), max(workers)
    seconds, steps = [], []
    for (t, w, m, tau), r in rows.items():
        other = rows.get((t, few, m, tau))
        if t != task or w != many or other is None:
            continue
        seconds.append(compare(r["times"], other["times"]))
        steps.append(compare(r["steps_list"], other["steps_list"]))
    count = lambda xs: ", ".join(f"{xs.count(k)} {k}" for k in ("lower", "noise", "higher"))  # noqa: E731
    majority = lambda xs: ("held" if xs.count("lower") > len(xs) / 2 else "did not hold"  # noqa: E731
                           if xs.count("higher") > len(xs) / 2 else "inside the noise")
    return {"claim": "more workers reach a given error sooner", "task": task,
            "workers": f"{many} vs {few}", "verdict": majority(seconds) if seconds else
            "not measured", "verdict_steps": majority(steps) if steps else "not measured",
            "detail": f"time to target at {many} vs {few} workers over {len(seconds)} "
                      f"(method, tau): {count(seconds)}; in steps per worker: {count(steps)}"}


def fmt_time(row: Dict[str, Any]) -> str:
    if not row["reached"]:
        return "never"
    return f"{row['time_mean']:.2f}+-{row['time_sd']:.2f} s ({row['reached']}/{row['seeds']})"


def protocol_findings(summary: List[Dict[str, Any]], settings: ProtocolSettings,
                      workers: Sequence[int]) -> List[Dict[str, Any]]:
    rows = {(r["task"], r["workers"], r["method"], r["tau"]): r for r in summary}
    out = []
    for task in settings.tasks:
        floor = 1.0 / 360  # one test image of digits' 360
        ran = [w for w in workers if any(k[0] == task and k[1] == w for k in rows)]
        for w in ran:
            if len(settings.taus) > 1:
                out.append(stability_findings(rows, task, w, settings.taus, floor))
            out.append(fastest_findings(rows, task, w, settings.taus))
        if len(ran) > 1:
            out.append(workers_findings(rows, task, ran))
    return out


# ------------------------------------------------------------------------------ output


def render_protocol(payload: Dict[str, Any]) -> str:
    cfg = payload["config"]
    lines = [f"## the paper's protocol: {cfg['steps']} steps/worker, batch {cfg['batch']}/"
             f"worker, {cfg['seeds']} seeds at the rate chosen on the validation split, "
             f"center evaluated every {cfg['eval_every']} steps"]
    for task in cfg["tasks"]:
        for w in cfg["workers"]:
            rows = [r for r in payload["summary"] if r["task"] == task and r["workers"] == w]
            if not rows:
                continue
            lines += ["", f"### {task}, {w} workers (target {TASKS[task].target:.0%} test "
                          f"error; {TASKS[task].about})", "",
                      "Final center test error, mean +- sd over seeds [time to target, s]:", "",
                      protocol_matrix(rows, cfg["taus"]), "", protocol_table(rows)]
    edge = [r for r in payload["summary"] if r.get("grid_edge")]
    lines += ["", f"{len(edge)} of {len(payload['summary'])} chosen rates are still at an edge "
                  f"of their grid after up to {cfg.get('grid_extend', 0)} extension(s) by a "
                  f"factor {cfg.get('grid_step', 3):g}"
                  + (": " + ", ".join(f"{r['task']}/{r['workers']}w/{r['method']}"
                                      f"{'' if r['tau'] is None else '-tau' + str(r['tau'])}"
                                      for r in edge) if edge else ""),
              "", "### The paper's claims, here", ""]
    for f in payload["findings"]:
        extra = f" (in steps: {f['verdict_steps']})" if "verdict_steps" in f else ""
        lines.append(f"- **{f['claim']}** ({f['task']}, {f['workers']} workers): "
                     f"**{f['verdict']}**{extra}. {f['detail']}")
    return "\n".join(lines)


def protocol_matrix(rows: List[Dict[str, Any]], taus: Sequence[int]) -> str:
    """A row per method, a column per tau: final error mean +- sd [mean time to target]."""
    cell = {(r["method"], r["tau"]): r for r in rows}
    body = []
    for method in [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]:
        cells = []
        for tau in taus:
            r = cell.get((method, None if method == "sgd" else tau))
            when = "never" if r is None or not r["reached"] else f"{r['time_mean']:.1f}" + (
                "" if r["reached"] == r["seeds"] else f", {r['reached']}/{r['seeds']}")
            cells.append("-" if r is None else
                         f"{r['final_mean']:.1%} +- {r['final_sd']:.1%} [{when}]")
        body.append([method, *cells])
    return format_table(["method", *(f"tau {t}" for t in taus)], body)


def protocol_table(rows: List[Dict[str, Any]]) -> str:
    headers = ["method", "tau", "lr (chosen)", "final test error", "best test error",
               "time to target (s)", "steps to target", "train s", "diverged"]
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    rows = sorted(rows, key=lambda r: (r["tau"] or 0, order.get(r["method"], 99)))
    body = [[r["method"], r["tau"] or "-", f"{r['lr']:.3g}",
             f"{r['final_mean']:.1%} +- {r['final_sd']:.1%}", f"{r['best_mean']:.1%}",
             fmt_time(r), "-" if r["steps_mean"] is None else f"{r['steps_mean']:.0f}",
             r["seconds_mean"], f"{r['diverged']}/{r['seeds']}"] for r in rows]
    return format_table(headers, body)


def curve_band(runs: List[Dict[str, Any]], points: int = 60):
    """Common time grid (to the longest run's end); each run's error is its latest
    evaluation at that time (a run that ended keeps its final error). Returns (times, mean,
    low, high) in seconds and percent."""
    end = max(r["history"][-1]["seconds"] for r in runs)
    grid = [end * i / (points - 1) for i in range(points)]
    curves = []
    for r in runs:
        hist, k, ys = r["history"], 0, []
        for t in grid:
            while k + 1 < len(hist) and hist[k + 1]["seconds"] <= t:
                k += 1
            ys.append(100 * hist[k]["test_error"])
        curves.append(ys)
    cols = list(zip(*curves))
    return grid, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot_protocol(payload: Dict[str, Any], task: str, path: str) -> None:
    """The paper's figure: center test error against wall-clock, one panel per tau (rows:
    worker counts); lines are the mean over seeds at the chosen rate, bands min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = payload["config"]
    taus = cfg["taus"]
    workers = [w for w in cfg["workers"] if any(r["task"] == task and r["workers"] == w
                                                for r in payload["runs"])]
    fig, axes = plt.subplots(len(workers), len(taus), figsize=(4.2 * len(taus),
                             3.4 * len(workers)), squeeze=False, sharey=True)
    colors = {m: f"C{i}" for i, m in enumerate(ALL_METHODS)}
    colors["sgd"] = "k"
    for row, w in zip(axes, workers):
        for ax, tau in zip(row, taus):
            for method in cfg["methods"]:
                runs = [r for r in payload["runs"] if r["task"] == task and r["workers"] == w
                        and r["method"] == method and r["tau"] in (tau, None) and r.get("chosen")]
                if not runs:
                    continue
                xs, mean, low, high = curve_band(runs)
                label = "sync SGD (hvd)" if method == "sgd" else method
                ax.plot(xs, mean, color=colors[method], label=label,
                        linestyle="--" if method == "sgd" else "-")
                ax.fill_between(xs, low, high, color=colors[method], alpha=0.15, linewidth=0)
            ax.axhline(100 * TASKS[task].target, color="grey", linewidth=0.6, linestyle=":")
            ax.set_title(f"{w} workers, tau = {tau}", fontsize=10)
            ax.set_xlabel("training wall-clock (s, 2 CPU cores)", fontsize=8)
            ax.set_ylim(0, min(100, 400 * TASKS[task].target))
            ax.grid(alpha=0.3)
        row[0].set_ylabel("center test error (%)")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{task}: center test error vs wall-clock; mean of {cfg['seeds']} seeds at the "
                 f"validation-chosen lr, band = min..max; dotted: target", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------ command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None,
                   help=f"default: {' '.join(PROTOCOL_METHODS)} (+ diloco where hvd_easgd has it)")
    p.add_argument("--taus", type=int, nargs="+", default=None,
                   help="default: 1 4 16 64 (--quick: 1 16)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts, one horovodrun job each (default 2 4; --quick: 2)")
    p.add_argument("--seeds", type=int, default=None,
                   help="runs at the chosen lr (default 3; --quick: 2)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None,
                   help=f"default: {' '.join(TASKS)} (--quick: digits-hard)")
    p.add_argument("--more-workers-tasks", nargs="*", choices=sorted(TASKS), default=None,
                   help="the tasks also run at the larger worker counts (default: digits-hard; "
                        "plain digits runs at the smallest only)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per worker, every run (default {PROTOCOL_STEPS}; --quick: 24)")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between evaluations (default {PROTOCOL_EVAL_EVERY}; --quick: 8)")
    p.add_argument("--batch", type=int, default=PROTOCOL_BATCH, help="per-worker batch size")
    p.add_argument("--quick", action="store_true",
                   help="the CI variant: 2 workers, digits-hard, taus 1 16, 2 rates (one "
                        "extension), 2 seeds, 24 steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="figures: one PNG per task, PATH's stem + _TASK")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="summarise and plot a saved JSON instead of running")
    p.add_argument("--protocol-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return with_defaults(args, p)


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    args = parse_args(argv)
    if args.protocol_worker:
        return protocol_worker(args)
    return protocol_driver(args)


if __name__ == "__main__":
    main()
