"""hvd-easgd's Horovod settings (hvd_easgd/optim/tuning.py) and the launchers that apply them:
which value wins (the user's, a recipe's, hvd-easgd's default), what is said about it, and
what each launcher exports."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from hvd_easgd.optim import tuning
from tests.hvdrun import REPO

CYCLE = tuning.HOROVOD_SETTINGS["HOROVOD_CYCLE_TIME"]


@pytest.fixture(autouse=True)
def horovod_not_started(monkeypatch):
    """These tests are about a process before ``hvd.init()``; other tests in the same pytest
    process start Horovod in-process (size 1), so hide it unless a test brings its own."""
    monkeypatch.setitem(sys.modules, "horovod.torch", None)


def test_apply_sets_defaults_and_keeps_user_values():
    env = {}
    assert tuning.apply_horovod_settings(environ=env) == tuning.HOROVOD_SETTINGS
    # marked as hvd-easgd's default: a recipe run later in this process may replace it
    assert env == {**tuning.HOROVOD_SETTINGS, tuning.DEFAULTED_ENV: "HOROVOD_CYCLE_TIME"}
    assert tuning.apply_horovod_settings(environ=env, recipe=tuning.recipe_settings(2)) == {
        "HOROVOD_CYCLE_TIME": "2"}
    env = {"HOROVOD_CYCLE_TIME": "3"}
    assert tuning.apply_horovod_settings(environ=env) == {}
    assert env["HOROVOD_CYCLE_TIME"] == "3"
    assert tuning.effective_settings(env) == {"HOROVOD_CYCLE_TIME": "3"}
    assert tuning.apply_horovod_settings(overwrite=True, environ=env) == {
        "HOROVOD_CYCLE_TIME": CYCLE}
    assert env["HOROVOD_CYCLE_TIME"] == CYCLE
    assert tuning.effective_settings({}) == tuning.HOROVOD_DEFAULTS


def test_a_recipe_replaces_defaults_silently():
    recipe = tuning.recipe_settings(3)
    assert recipe == {"HOROVOD_CYCLE_TIME": "3"} and tuning.recipe_settings(None) == {}
    assert tuning.recipe_settings(2.5) == {"HOROVOD_CYCLE_TIME": "2.5"}
    notes = []
    env = {}  # nothing set: the recipe's value, not hvd-easgd's default
    assert tuning.apply_horovod_settings(environ=env, recipe=recipe, warn=notes.append) == recipe
    assert env["HOROVOD_CYCLE_TIME"] == "3"
    env = {"HOROVOD_CYCLE_TIME": CYCLE, tuning.DEFAULTED_ENV: "HOROVOD_CYCLE_TIME"}  # a launcher
    assert tuning.apply_horovod_settings(environ=env, recipe=recipe, warn=notes.append) == recipe
    assert env["HOROVOD_CYCLE_TIME"] == "3"
    env = {"HOROVOD_CYCLE_TIME": "3.0"}  # the user's value is the recipe's: nothing to say
    tuning.apply_horovod_settings(environ=env, recipe=recipe, warn=notes.append)
    assert env["HOROVOD_CYCLE_TIME"] == "3.0"
    env = {}  # overwrite=True restores hvd-easgd's defaults, never over the recipe's value
    tuning.apply_horovod_settings(overwrite=True, environ=env, recipe=recipe, warn=notes.append)
    assert env["HOROVOD_CYCLE_TIME"] == "3"
    assert notes == []


def test_the_users_value_wins_over_a_recipe_with_a_warning():
    recipe = tuning.recipe_settings(3)
    env = {"HOROVOD_CYCLE_TIME": "7"}  # exported by the user (no launcher marker)
    with pytest.warns(RuntimeWarning) as caught:
        assert tuning.apply_horovod_settings(environ=env, recipe=recipe) == {}
    assert env["HOROVOD_CYCLE_TIME"] == "7"
    [message] = [str(w.message) for w in caught]
    # both values, and how to get the recipe's
    assert "HOROVOD_CYCLE_TIME=7 from your environment replaces the recipe's" in message
    assert "horovod.cycle_time_ms=3; unset HOROVOD_CYCLE_TIME" in message
    notes = []  # the marker names other variables only: still the user's value
    env = {"HOROVOD_CYCLE_TIME": "7", tuning.DEFAULTED_ENV: "HOROVOD_OTHER"}
    assert tuning.apply_horovod_settings(environ=env, recipe=recipe, warn=notes.append) == {}
    assert env["HOROVOD_CYCLE_TIME"] == "7" and len(notes) == 1 and "=7" in notes[0]
    # marked as ours once, but changed since (exported after eval "$(launch/cluster_env.sh)")
    notes = []
    env = {"HOROVOD_CYCLE_TIME": "7", tuning.DEFAULTED_ENV: "HOROVOD_CYCLE_TIME"}
    assert tuning.apply_horovod_settings(environ=env, recipe=recipe, warn=notes.append) == {}
    assert env["HOROVOD_CYCLE_TIME"] == "7" and len(notes) == 1
    # overwrite=True: the recipe's over everything
    env = {"HOROVOD_CYCLE_TIME": "7"}
    assert tuning.apply_horovod_settings(overwrite=True, environ=env, recipe=recipe) == recipe


def test_a_recipe_is_not_applied_when_tuning_is_off_or_too_late():
    recipe = tuning.recipe_settings(3)
    env = {tuning.DISABLE_ENV: "0"}
    with pytest.warns(RuntimeWarning, match="not applied either"):
        assert tuning.apply_horovod_settings(environ=env, recipe=recipe) == {}
    assert "HOROVOD_CYCLE_TIME" not in env
    env = {tuning.DISABLE_ENV: "0", "HOROVOD_CYCLE_TIME": "7"}
    with pytest.warns(RuntimeWarning, match="not applied either"):
        assert tuning.apply_horovod_settings(environ=env, recipe=recipe) == {}
    assert env["HOROVOD_CYCLE_TIME"] == "7"
    env = {}  # null in the recipe: the old behaviour
    assert tuning.apply_horovod_settings(environ=env, recipe=tuning.recipe_settings(None)) == \
        tuning.HOROVOD_SETTINGS
    env = {"HOROVOD_CYCLE_TIME": "7"}
    assert tuning.apply_horovod_settings(environ=env, recipe=tuning.recipe_settings(None)) == {}
    assert env["HOROVOD_CYCLE_TIME"] == "7"
    # after hvd.init(): the trainer says why the recipe's value is not the one Horovod runs with
    late = tuning.late_recipe_warning(recipe, {"HOROVOD_CYCLE_TIME": "20"})
    assert "HOROVOD_CYCLE_TIME=3" in late and "cannot take effect" in late
    assert "runs with HOROVOD_CYCLE_TIME=20" in late
    assert "runs with HOROVOD_CYCLE_TIME=1 " in tuning.late_recipe_warning(recipe, {})  # Horovod's
    assert tuning.late_recipe_warning(recipe, {"HOROVOD_CYCLE_TIME": "3"}) is None


@pytest.mark.parametrize("off", ["0", "false", "No", " off "])
def test_apply_is_disabled_by_the_environment(off):
    env = {tuning.DISABLE_ENV: off}
    assert tuning.apply_horovod_settings(environ=env) == {}
    assert "HOROVOD_CYCLE_TIME" not in env
    assert tuning.apply_horovod_settings(environ={tuning.DISABLE_ENV: "1"}) != {}


def test_apply_after_init_warns_and_changes_nothing(monkeypatch):
    fake = types.ModuleType("horovod.torch")
    fake.is_initialized = lambda: True
    monkeypatch.setitem(sys.modules, "horovod.torch", fake)
    env = {}
    with pytest.warns(RuntimeWarning, match="before hvd.init"):
        assert tuning.apply_horovod_settings(environ=env) == {}
    assert env == {}


def test_apply_uses_os_environ_by_default(monkeypatch):
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    monkeypatch.delenv(tuning.DISABLE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # not imported
    applied = tuning.apply_horovod_settings()
    assert applied == tuning.HOROVOD_SETTINGS and os.environ["HOROVOD_CYCLE_TIME"] == CYCLE
    assert tuning.export_lines() == f"export HOROVOD_CYCLE_TIME={CYCLE}"


# ------------------------------------------------------------------ launchers


def _launch_env(tmp_path, **extra):
    """The launchers with a fake horovodrun that prints the Horovod settings it receives."""
    fake = tmp_path / "fake_horovodrun"
    fake.write_text('#!/usr/bin/env bash\n'
                    'echo "cycle=${HOROVOD_CYCLE_TIME-unset}${HVD_EASGD_DEFAULTED:+ defaulted}"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HOROVOD_", "NCCL_", "SLURM_")) and k not in (
               "HVD_EASGD_TUNE", tuning.DEFAULTED_ENV, "CLUSTER_ENV", "HOSTS", "NP", "SLOTS", "DRY_RUN", "CONFIG")}
    env.update(HOROVODRUN=str(fake), **extra)
    return env


@pytest.mark.parametrize("script,extra", [
    ("run_local.sh", {}),
    ("run_local.sh", {"CLUSTER_ENV": "launch/cluster_env.sh"}),
    ("run_multinode.sh", {"HOSTS": "a,b"}),            # sources cluster_env.sh
    ("run_multinode.sh", {"HOSTS": "a,b", "CLUSTER_ENV": ""}),
])
def test_launchers_export_the_settings(tmp_path, script, extra):
    def launch(**more):
        proc = subprocess.run(["bash", f"launch/{script}"], cwd=str(REPO),
                              env=_launch_env(tmp_path, **extra, **more), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert launch() == f"cycle={CYCLE} defaulted"           # a recipe may replace it
    assert launch(HOROVOD_CYCLE_TIME="3") == "cycle=3"       # the user's value wins
    assert launch(HVD_EASGD_TUNE="0") == "cycle=unset"       # Horovod's own default


def test_dry_run_names_the_settings_on_stderr(tmp_path):
    proc = subprocess.run(["bash", "launch/run_local.sh"], cwd=str(REPO),
                          env=_launch_env(tmp_path, DRY_RUN="1"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"HOROVOD_CYCLE_TIME={CYCLE}" in proc.stderr
    assert "HOROVOD_CYCLE_TIME" not in proc.stdout  # the printed command itself is unchanged


