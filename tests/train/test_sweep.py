"""hvd-easgd-sweep: the plan (grid, seeds, same initialisation), its errors, the report, and one
real sweep end to end (2 learning rates at one seed, 2 Gloo workers, stopped by train.max_time)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvd_easgd.train import checkpoint as ckpt
from hvd_easgd.train import sweep
from hvd_easgd.train.config import ConfigError, load_config
from hvd_easgd.train.metrics import read_metrics
from tests.hvdrun import HOROVODRUN, REPO, START_TIMEOUT, worker_env

DIGITS = REPO / "recipes" / "demo" / "digits.yaml"


def tiny_recipe(tmp_path: Path, sweep_section: str = "  lrs: [0.05, 0.2]\n  seeds: [0, 1]\n",
                max_time: float = 1.0) -> Path:
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(
        f"_base_: {DIGITS}\nname: tiny_sweep\n"
        f"train:\n  epochs: 1000\n  max_time: {max_time}\n  eval_every: 10\n  batch_size: 32\n"
        f"log:\n  every: 5\n  tensorboard: false\n  progress: false\n"
        f"checkpoint:\n  every: 0\nlaunch:\n  np: 2\n  hosts: localhost:2\n"
        f"sweep:\n{sweep_section}")
    return path


def plan(recipe, *extra):
    return sweep.plan(sweep.build_parser().parse_args([str(recipe), *extra]))


def test_plan_expands_lrs_and_seeds_with_one_initialisation(tmp_path):
    cfg, out, jobs = plan(tiny_recipe(tmp_path), "--out", str(tmp_path / "out"))
    assert [(j.lr, j.seed) for j in jobs] == [(0.05, 0), (0.05, 1), (0.2, 0), (0.2, 1)]
    assert len({j.run_dir for j in jobs}) == 4
    for job in jobs:
        cmd = " ".join(job.command)
        assert f"optimizer.lr={job.lr!r}" in cmd and f"train.seed={job.seed}" in cmd
        assert "train.init_seed=0" in cmd  # the recipe's train.seed: one initialisation
        assert "-np 2 -H localhost:2" in cmd and f"--run-dir {job.run_dir}" in cmd
    # the command line replaces the recipe's grid
    _, _, jobs = plan(tiny_recipe(tmp_path), "--lrs", "0.1", "--seeds", "3", "4", "5")
    assert [(j.lr, j.seed) for j in jobs] == [(0.1, 3), (0.1, 4), (0.1, 5)]


def test_init_seed_fixes_the_initialisation_and_seed_the_rest():
    from hvd_easgd.train.factory import create_parts

    def initial(*sets):
        cfg = load_config(DIGITS, ["optimizer.method=sgd", "launch.np=null", "train.device=cpu", *sets])
        model = create_parts(cfg, rank=0, size=1, local_rank=0).model
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    same = [initial("train.init_seed=7", f"train.seed={s}") for s in (0, 1)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(initial("train.seed=0"), initial("train.seed=1"))


@pytest.mark.parametrize("section, message", [
    ("  lr: [0.1]\n", "unknown key 'sweep.lr' (did you mean 'lrs'?)"),
    ("  lrs: [0.1, 0.1]\n", "'sweep.lrs' lists a value twice"),
    ("  lrs: [-0.1]\n", "'sweep.lrs' must hold learning rates > 0"),
    ("  seeds: []\n", "'sweep.seeds' is empty"),
])
def test_bad_sweep_section_is_a_config_error_naming_the_fix(tmp_path, section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tiny_recipe(tmp_path, section))
    with pytest.raises(sweep.SweepError, match="lrs|seeds"):
        plan(tiny_recipe(tmp_path, section))


def test_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(sweep.SweepError, match="recipe not found: .*e.g. recipes/demo"):
        plan(tmp_path / "missing.yaml")
    with pytest.raises(sweep.SweepError, match=r"no learning-rate grid: .*--lrs"):
        plan(tiny_recipe(tmp_path, "  seeds: [0]\n"))
    assert sweep.main([str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a learning rate must be a number
        sweep.build_parser().parse_args([str(DIGITS), "--lrs", "fast"])


def test_print_mode_prints_one_job_per_line(tmp_path, capsys):
    assert sweep.main([str(tiny_recipe(tmp_path)), "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("--config" in line for line in lines)
    assert not (tmp_path / "o").exists()  # printing runs nothing


def fake_run(run_dir: Path, errors, finished=True):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, e in enumerate(errors, 1):
            f.write(json.dumps({"step": 10 * i, "epoch": 0.0, "wall_time": 1.0 * i, "samples": 0,
                                "center/test_error": e}) + "\n")
            f.write(json.dumps({"step": 10 * i, "epoch": 0.0, "wall_time": 1.0 * i, "samples": 0,
                                "train/loss": 1.0}) + "\n")
    if finished:
        (run_dir / "center.pt").write_bytes(b"x")


def test_report_picks_the_smallest_error_reached_not_the_final(tmp_path):
    _, out, jobs = plan(tiny_recipe(tmp_path), "--out", str(tmp_path / "o"))
    curves = {"lr0.05_seed0": [0.5, 0.2, 0.3], "lr0.05_seed1": [0.5, 0.25, 0.22],
              "lr0.2_seed0": [0.4, 0.15, 0.9], "lr0.2_seed1": [0.6, 0.3]}
    for name, errors in curves.items():
        fake_run(out / name, errors, finished=name != "lr0.2_seed1")
    summary = sweep.summarise(jobs)
    best = summary["best"]
    assert (best["lr"], best["seed"], best["best_error"], best["best_step"]) == (0.2, 0, 0.15, 20)
    assert best["final_error"] == 0.9  # diverged later: the paper's rule still picks it
    per_lr = {p["lr"]: p for p in summary["per_lr"]}
    assert per_lr[0.05]["mean_best_error"] == pytest.approx(0.21)
    assert per_lr[0.2]["min_best_error"] == 0.15
    assert [r["status"] for r in summary["runs"]][-1] == "incomplete"
    text = sweep.render(summary, "tiny")
    assert "**<- best**" in text and "lr 0.2, seed 0: 15.00% at step 20" in text


@pytest.mark.timeout(400)
def test_sweep_runs_end_to_end_and_stops_on_time(tmp_path):
    """Real horovodrun jobs (2 workers each), each stopped by train.max_time = 1 s: two
    learning rates at one seed other than the recipe's (so every run shares the recipe's
    initialisation but not its data order). The grid over seeds is the plan's
    (test_plan_expands_lrs_and_seeds_with_one_initialisation) and the report's per-lr figures
    over seeds are test_report_picks_the_smallest_error_reached_not_the_final's."""
    recipe, out = tiny_recipe(tmp_path, "  lrs: [0.05, 0.2]\n  seeds: [1]\n"), tmp_path / "sweep"
    launcher = f"{HOROVODRUN} --gloo --start-timeout {START_TIMEOUT}"
    proc = subprocess.run(
        [sys.executable, "-m", "hvd_easgd.train.sweep", str(recipe), "--out", str(out), "--run",
         "--launcher", launcher], cwd=str(REPO), env=worker_env(), capture_output=True,
        text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    summary = json.loads((out / sweep.SUMMARY_FILE).read_text())
    assert len(summary["runs"]) == 2 and all(r["finished"] for r in summary["runs"])
    assert sorted((r["lr"], r["seed"]) for r in summary["runs"]) == [(0.05, 1), (0.2, 1)]
    best = min(summary["runs"], key=lambda r: (r["best_error"], r["lr"], r["seed"]))
    assert summary["best"] == best and "best run: lr" in proc.stdout
    for run in summary["runs"]:
        run_dir = Path(run["run_dir"])
        cfg = load_config(run_dir / "config.yaml")
        assert (cfg.optimizer.lr, cfg.train.seed, cfg.train.init_seed) == (run["lr"], run["seed"], 0)
        logs = [r for r in read_metrics(run_dir) if "train/loss" in r]
        # stopped at the first check (every log.every = 5 steps) past max_time, not before
        assert logs[-1]["wall_time"] >= 1.0 > logs[-2]["wall_time"], logs[-3:]
        assert logs[-1]["step"] % 5 == 0 and logs[-1]["step"] < 1000
        assert "center/test_error" in read_metrics(run_dir)[-1]  # the final evaluation
        assert ckpt.list_checkpoints(run_dir) and (run_dir / ckpt.CENTER_FILE).exists()
