"""Every recipe: valid, documented, covering the paper's grid, and runnable (a smoke run on fake data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hvd_easgd.config import load_config
from tests.hvdrun import REPO, run_workers

RECIPES = REPO / "recipes"
LEAVES = sorted(p for p in RECIPES.rglob("*.yaml") if p.name != "base.yaml")


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def test_there_are_recipes():
    assert len(LEAVES) >= 40
    assert (RECIPES / "demo" / "digits.yaml") in LEAVES


@pytest.mark.parametrize("recipe", LEAVES, ids=rel)
def test_recipe_is_valid_and_says_how_to_run_it(recipe):
    cfg = load_config(recipe)
    text = recipe.read_text()
    assert cfg.name == recipe.stem
    if cfg.elastic.enabled:  # the number of workers changes: launched by run_elastic.sh
        m = re.search(r"^#\s+.*launch/run_elastic\.sh (\S+)$", text, re.M)
        assert m and m.group(1) == rel(recipe), "the recipe states the command that runs it"
        assert cfg.elastic.min_np is not None and cfg.elastic.max_np is not None
        return
    np = cfg.launch.np
    assert np is not None, "launch.np records the intended number of workers"
    m = re.search(r"^#\s+horovodrun -np (\d+) -H (\S+) .*hvd-easgd-train --config (\S+)", text, re.M)
    assert m, "the recipe states the command that runs it"
    assert int(m.group(1)) == np
    assert m.group(3) == rel(recipe)
    assert m.group(2) == cfg.launch.hosts
    slots = sum(int(h.rsplit(":", 1)[1]) for h in m.group(2).split(","))
    assert slots == np, "the -H host list has one slot per worker"
    if cfg.data.name in ("cifar10", "imagenet"):
        assert "data.root" in text  # where the data must be (the dataset base says how)
        assert "data.root" in (recipe.parent / "base.yaml").read_text()
        assert cfg.train.batch_size == 128 and cfg.optimizer.beta == 0.9 and cfg.optimizer.momentum == 0.99
        assert cfg.optimizer.weight_decay == (1e-4 if cfg.data.name == "cifar10" else 1e-5)
    assert cfg.name == recipe.stem


def _grid(folder):
    out = {}
    for p in (RECIPES / folder).glob("*.yaml"):
        if p.name == "base.yaml":
            continue
        cfg = load_config(p)
        out[(cfg.optimizer.method, cfg.launch.np, cfg.optimizer.tau if "tau" in p.stem else None)] = p
    return out


def test_cifar10_covers_the_papers_study():
    grid = _grid("cifar10")
    for method in ("easgd", "eamsgd", "downpour", "mdownpour", "adownpour", "mvadownpour"):
        for tau in (1, 4, 16, 64):
            assert (method, 4, tau) in grid, (method, tau)
    for method in ("easgd", "eamsgd"):
        for p in (4, 8, 16):
            assert (method, p, 16) in grid, (method, p)
    assert ("sync_sgd", 4, None) in grid
    assert ("sgd", 1, None) in grid and ("msgd", 1, None) in grid


def test_imagenet_covers_the_papers_study():
    grid = _grid("imagenet")
    for p in (4, 8):
        for method in ("easgd", "eamsgd"):
            assert (method, p, 10) in grid
        for method in ("downpour", "mdownpour"):
            assert (method, p, 1) in grid
        assert ("sync_sgd", p, None) in grid


def test_readme_explains_every_learning_rate():
    readme = (RECIPES / "README.md").read_text()
    for recipe in LEAVES:
        cfg = load_config(recipe)
        lr = cfg.optimizer.lr
        assert f"{lr:g}" in readme or repr(lr) in readme, f"{rel(recipe)}: lr {lr} not in recipes/README.md"
    assert "grid search" in readme


@pytest.mark.timeout(900)
def test_every_recipe_runs_a_few_steps_on_fake_data(tmp_path):
    """One horovodrun -np 2 job runs every recipe in-process, 3 steps of batch 2 on tiny fake data."""
    recipes = [str(p) for p in LEAVES]
    ranks = run_workers("train_recipes.py", tmp_path, np=2, args=["--recipes", json.dumps(recipes)],
                        timeout=880)
    failures = {}
    for r, result in enumerate(ranks):
        for recipe in recipes:
            got = result.get(recipe)
            if got is None:
                failures[f"rank {r}: {recipe}"] = "not run (an earlier recipe failed)"
            elif not got["ok"]:
                failures[f"rank {r}: {recipe}"] = got["traceback"]
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
    for recipe in recipes:
        got = ranks[0][recipe]
        assert got["step"] == 3
        assert 0.0 <= got["center/test_error"] <= 1.0
        assert got["center_path"] and Path(got["center_path"]).exists()
