"""Config schema, recipes with `_base_`, `--set` overrides, and the errors users see."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hvd_easgd.train.config import (
    ConfigError, apply_overrides, config_from_dict, load_config, save_config, valid_keys,
)

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "model:\n  name: digits_net\noptimizer:\n  lr: 0.1\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_recipe_gets_schema_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "r.yaml", MINIMAL))
    assert cfg.optimizer.lr == 0.1 and cfg.optimizer.method == "easgd"
    assert cfg.optimizer.beta == 0.9 and cfg.optimizer.momentum == 0.99
    assert cfg.train.batch_size == 128
    assert cfg.name == "r"  # defaults to the recipe's file name


def test_unknown_key_lists_valid_keys_of_its_section(tmp_path):
    p = write(tmp_path / "r.yaml", MINIMAL + "  lrr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "optimizer.lrr" in msg and str(p) in msg
    assert "did you mean 'lr'" in msg
    for key in valid_keys("optimizer"):
        assert key in msg
    assert "tau" in msg and "schedule" in msg


def test_unknown_nested_and_top_level_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.schedule\.warmup.*valid keys of optimizer\.schedule: "
                                          r"name, warmup_epochs"):
        load_config(write(tmp_path / "a.yaml", MINIMAL + "  schedule:\n    warmup: 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*valid keys of the top level: .*train"):
        load_config(write(tmp_path / "b.yaml", MINIMAL + "trian:\n  epochs: 3\n"))


def test_section_given_a_scalar(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimizer' must be a mapping.*valid keys of optimizer"):
        load_config(write(tmp_path / "r.yaml", "model:\n  name: x\noptimizer: 0.1\n"))


def test_wrong_type_names_key_and_lists_section(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "r.yaml", MINIMAL + "  tau: sixteen\n"))
    msg = str(e.value)
    assert "optimizer.tau" in msg and "sixteen" in msg and "valid keys of optimizer" in msg
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(write(tmp_path / "s.yaml", MINIMAL + "train:\n  batch_size: 1.5\n"))
    with pytest.raises(ConfigError, match=r"data\.fake_image_shape"):
        load_config(write(tmp_path / "t.yaml", MINIMAL + "data:\n  fake_image_shape: [3, a, 8]\n"))


def test_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "r.yaml", "optimizer:\n  tau: 4\n"))
    msg = str(e.value)
    assert "model.name" in msg and "optimizer.lr" in msg and "--set" in msg


def test_bad_choices_list_the_valid_values(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.method.*'easgdd'.*easgd, eamsgd, downpour"):
        load_config(write(tmp_path / "r.yaml", MINIMAL + "  method: easgdd\n"))
    with pytest.raises(ConfigError, match="sync, async"):
        load_config(write(tmp_path / "s.yaml", MINIMAL + "  mode: later\n"))
    with pytest.raises(ConfigError, match="not both"):
        load_config(write(tmp_path / "t.yaml", MINIMAL + "  alpha: 0.2\n"))
    with pytest.raises(ConfigError, match=r"beta.*\(0, 1\]"):
        load_config(write(tmp_path / "u.yaml", MINIMAL + "  beta: 1.5\n"))
    with pytest.raises(ConfigError, match="optimizer.tau"):
        load_config(write(tmp_path / "v.yaml", MINIMAL + "  tau: 0\n"))


def test_augment_is_an_imagenet_choice(tmp_path):
    from hvd_easgd.train import config, data

    assert config.IMAGENET_AUGMENTS == data.IMAGENET_AUGMENTS
    recipe = load_config(REPO / "recipes" / "imagenet" / "easgd_p4_tau10.yaml")
    assert recipe.data.augment == "overfeat"
    with pytest.raises(ConfigError, match=r"data\.augment.*'flip'.*overfeat, resized_crop"):
        load_config(REPO / "recipes" / "imagenet" / "easgd_p4_tau10.yaml", ["data.augment=flip"])
    with pytest.raises(ConfigError, match=r"data\.augment.*imagenet only.*null"):
        load_config(REPO / "recipes" / "demo" / "digits.yaml", ["data.augment=overfeat"])


def test_horovod_cycle_time_must_be_positive_or_null(tmp_path):
    demo = REPO / "recipes" / "demo" / "digits.yaml"
    assert load_config(demo).horovod.cycle_time_ms == 1
    assert load_config(demo, ["horovod.cycle_time_ms=null"]).horovod.cycle_time_ms is None
    assert load_config(demo, ["horovod.cycle_time_ms=2.5"]).horovod.cycle_time_ms == 2.5
    for bad in ("0", "-5", "0.0"):
        with pytest.raises(ConfigError, match=r"'horovod\.cycle_time_ms' must be > 0 or null, "
                                              r"got -?0?\.?[05]+.*e\.g\. 1 .*null: HOROVOD_CYCLE_TIME"):
            load_config(demo, [f"horovod.cycle_time_ms={bad}"])
    with pytest.raises(ConfigError, match=r"horovod\.cycle_time.*valid keys of horovod: cycle_time_ms"):
        load_config(demo, ["horovod.cycle_time=1"])
    with pytest.raises(ConfigError, match=r"valid keys of the top level: .*horovod"):
        load_config(write(tmp_path / "r.yaml", MINIMAL + "horovd:\n  cycle_time_ms: 1\n"))
    # --print-config shows it, and a resume with another value is a difference it names
    from hvd_easgd.train.config import diff_configs, to_yaml

    assert "horovod:\n  cycle_time_ms: 1" in to_yaml(load_config(demo))
    assert diff_configs(load_config(demo), load_config(demo, ["horovod.cycle_time_ms=20"])) == [
        "horovod.cycle_time_ms"]


def test_alpha_instead_of_beta(tmp_path):
    cfg = load_config(write(tmp_path / "r.yaml", MINIMAL + "  alpha: 0.2\n  beta: null\n"))
    assert cfg.optimizer.alpha == 0.2 and cfg.optimizer.beta is None


def test_base_chain_relative_to_each_file(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  batch_size: 64\n  epochs: 3\noptimizer:\n  tau: 2\n  lr: 0.5\n")
    write(tmp_path / "ds" / "base.yaml", "_base_: ../base.yaml\nmodel:\n  name: cifar_paper\ntrain:\n  epochs: 7\n")
    leaf = write(tmp_path / "ds" / "sub" / "leaf.yaml", "_base_: ../base.yaml\noptimizer:\n  tau: 16\n")
    cfg = load_config(leaf)
    assert cfg.train.batch_size == 64  # from the root base
    assert cfg.train.epochs == 7  # the middle base overrides the root
    assert cfg.model.name == "cifar_paper"
    assert cfg.optimizer.tau == 16 and cfg.optimizer.lr == 0.5  # the leaf overrides, the rest is kept
    assert cfg.name == "leaf"


def test_base_list_merges_in_order(tmp_path):
    write(tmp_path / "a.yaml", "optimizer:\n  lr: 1.0\n  tau: 3\n")
    write(tmp_path / "b.yaml", "optimizer:\n  lr: 2.0\n")
    leaf = write(tmp_path / "leaf.yaml", "_base_: [a.yaml, b.yaml]\nmodel:\n  name: digits_net\n")
    cfg = load_config(leaf)
    assert cfg.optimizer.lr == 2.0 and cfg.optimizer.tau == 3


def test_base_errors(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found: nope.yaml"):
        load_config(write(tmp_path / "c.yaml", "_base_: nope.yaml\n"))
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")
    # an error in a base names the base file
    write(tmp_path / "bad.yaml", "optimizer:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(write(tmp_path / "d.yaml", "_base_: bad.yaml\n" + MINIMAL))


def test_set_overrides(tmp_path):
    p = write(tmp_path / "r.yaml", MINIMAL)
    cfg = load_config(p, ["optimizer.lr=0.01", "optimizer.tau=64", "data.fake_image_shape=[1,8,8]",
                          "optimizer.schedule.milestones=[10,20]", "train.max_steps=5", "name=other"])
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.tau == 64
    assert list(cfg.data.fake_image_shape) == [1, 8, 8]
    assert list(cfg.optimizer.schedule.milestones) == [10.0, 20.0]
    assert cfg.train.max_steps == 5 and cfg.name == "other"
    # later overrides win; null works
    cfg = load_config(p, ["optimizer.lr=0.3", "optimizer.lr=0.4", "train.max_steps=null"])
    assert cfg.optimizer.lr == 0.4 and cfg.train.max_steps is None
    # overrides can supply required keys
    cfg = load_config(write(tmp_path / "empty.yaml", ""), ["model.name=digits_net", "optimizer.lr=1"])
    assert cfg.model.name == "digits_net"


def test_set_errors(tmp_path):
    p = write(tmp_path / "r.yaml", MINIMAL)
    with pytest.raises(ConfigError, match=r"--set optimizer\.lrr=1.*valid keys of optimizer"):
        load_config(p, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"--set optimizer\.tau=x.*optimizer\.tau"):
        load_config(p, ["optimizer.tau=x"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(p, ["optimizer.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path / "r.yaml", MINIMAL), ["optimizer.tau=7"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert "_base_" not in out.read_text()


def test_config_from_dict_checks_too():
    cfg = config_from_dict({"model": {"name": "digits_net"}, "optimizer": {"lr": 0.1}})
    assert cfg.optimizer.lr == 0.1
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        config_from_dict({"model": {"name": "digits_net"}, "optimizer": {"lrr": 0.1}})
    cfg = apply_overrides(cfg, ["train.epochs=2.5"])
    assert cfg.train.epochs == 2.5


def test_cli_print_config_and_errors(tmp_path, capsys):
    from hvd_easgd.train.cli import main

    p = write(tmp_path / "r.yaml", MINIMAL)
    assert main(["--config", str(p), "--set", "optimizer.tau=5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "tau: 5" in out and "lr: 0.1" in out
    assert main(["--config", str(p), "--set", "optimizer.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "optimizer.bogus" in err and "valid keys of optimizer" in err


def test_lr_schedules():
    from hvd_easgd.train.factory import lr_at

    def cfg(**schedule):
        return config_from_dict({"model": {"name": "m"}, "optimizer": {"lr": 1.0, "schedule": schedule}})

    spe, total = 10, 100
    c = cfg()
    assert lr_at(c, 1, spe, total) == 1.0 and lr_at(c, 100, spe, total) == 1.0
    c = cfg(name="step", milestones=[2, 5], gamma=0.1)
    assert lr_at(c, 20, spe, total) == 1.0  # 19 steps done: still epoch < 2
    assert lr_at(c, 21, spe, total) == pytest.approx(0.1)
    assert lr_at(c, 51, spe, total) == pytest.approx(0.01)
    c = cfg(name="cosine", min_lr=0.0)
    assert lr_at(c, 1, spe, total) == 1.0
    assert lr_at(c, 51, spe, total) == pytest.approx(0.5)
    assert lr_at(c, 101, spe, total) == pytest.approx(0.0, abs=1e-12)
    c = cfg(name="cosine", warmup_epochs=1, warmup_start_factor=0.1)
    assert lr_at(c, 1, spe, total) == pytest.approx(0.1)
    assert lr_at(c, 6, spe, total) == pytest.approx(0.55)
    assert lr_at(c, 11, spe, total) == pytest.approx(1.0)
    assert all(math.isfinite(lr_at(c, s, spe, total)) for s in range(1, 120))


@pytest.mark.parametrize("value", [None, "false"])
def test_start_early_reaches_the_optimizer(tmp_path, value):
    """`optimizer.start_early` (default true) is what the trainer's ElasticOptimizer gets."""
    import horovod.torch as hvd

    from hvd_easgd.train.models import build_model
    from hvd_easgd.train.factory import create_optimizer

    hvd.init()
    overrides = [] if value is None else [f"optimizer.start_early={value}"]
    cfg = load_config(write(tmp_path / "r.yaml", MINIMAL), overrides)
    model = build_model("digits_net", 10, in_channels=1)
    opt, kind = create_optimizer(cfg, model, hvd.rank())
    try:
        assert kind == "elastic" and opt.start_early is (value is None)
    finally:
        opt.close()


def test_elastic_with_hierarchy_is_refused_before_launch(tmp_path):
    recipe = write(tmp_path / "r.yaml", MINIMAL + "  hierarchy: host\n")
    load_config(recipe)  # fine without elastic
    with pytest.raises(ConfigError, match=r"optimizer\.hierarchy=null.*run_multinode\.sh"):
        load_config(recipe, ["elastic.enabled=true"])


def test_sync_sgd_steps_and_survivors_reach_the_optimizer(tmp_path):
    import horovod.torch as hvd

    from hvd_easgd.train.models import build_model
    from hvd_easgd.train.factory import create_optimizer

    recipe = write(tmp_path / "r.yaml", MINIMAL)
    cfg = load_config(recipe)
    assert (cfg.optimizer.sync_sgd_steps, cfg.optimizer.survivors) == (0, "own")
    with pytest.raises(ConfigError, match="optimizer.survivors"):
        load_config(recipe, ["optimizer.survivors=everyone"])
    with pytest.raises(ConfigError, match="optimizer.sync_sgd_steps"):
        load_config(recipe, ["optimizer.sync_sgd_steps=-1"])
    hvd.init()
    cfg = load_config(recipe, ["optimizer.sync_sgd_steps=5", "optimizer.survivors=center"])
    opt, kind = create_optimizer(cfg, build_model("digits_net", 10, in_channels=1), 0)
    try:
        assert kind == "elastic" and (opt.sync_sgd_steps, opt.survivors) == (5, "center")
    finally:
        opt.close()


DILOCO = REPO / "recipes" / "demo" / "digits_diloco.yaml"
NO_BETA = r"optimizer\.method=diloco takes no optimizer\.beta \(got {}\)"


def test_diloco_refuses_a_beta_given_for_it(tmp_path):
    """DiLoCo has no beta (hvd_easgd.ElasticOptimizer refuses beta= too): one given by --set, or
    by the recipe choosing diloco or a later one, is a ConfigError naming the knobs to tune; one
    inherited from recipes/base.yaml (0.9, for EASGD) is dropped, and the config says null."""
    cfg = load_config(DILOCO)
    assert cfg.optimizer.method == "diloco" and cfg.optimizer.beta is None
    for beta in ("0.5", "0.9"):  # the default's value too: it was given
        with pytest.raises(ConfigError, match=rf"^--set optimizer\.beta={beta}: "
                           + NO_BETA.format(beta) + r".*optimizer\.outer_lr \(now 0\.7\) and "
                           r"optimizer\.outer_momentum \(now 0\.9\).*set it to null"):
            load_config(DILOCO, [f"optimizer.beta={beta}"])
    digits = REPO / "recipes" / "demo" / "digits.yaml"
    with pytest.raises(ConfigError, match=NO_BETA.format(0.5)):  # the order of --set is no way out
        load_config(digits, ["optimizer.beta=0.5", "optimizer.method=diloco"])
    assert load_config(digits, ["optimizer.method=diloco"]).optimizer.beta is None
    assert load_config(DILOCO, ["optimizer.beta=null"]).optimizer.beta is None
    leaf = write(tmp_path / "leaf.yaml", f"_base_: {DILOCO}\noptimizer:\n  beta: 0.9\n")
    source = re.escape(str(leaf.resolve()))  # the recipe that gives it
    with pytest.raises(ConfigError, match=f"^{source}: " + NO_BETA.format(0.9)):
        load_config(leaf)
    with pytest.raises(ConfigError, match=NO_BETA.format(0.5)):
        load_config(write(tmp_path / "own.yaml", MINIMAL + "  method: diloco\n  beta: 0.5\n"))
    data = {"model": {"name": "digits_net"}, "optimizer": {"lr": 0.1, "method": "diloco"}}
    with pytest.raises(ConfigError, match="^config: " + NO_BETA.format(0.5)):
        config_from_dict({**data, "optimizer": {**data["optimizer"], "beta": 0.5}})
    # Saved configs say beta: null and load back; one saved before this check (0.9 next to
    # method: diloco, in config.yaml or a checkpoint) still loads, and --set is still checked.
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert "beta: null" in (tmp_path / "run" / "config.yaml").read_text()
    assert load_config(tmp_path / "run" / "config.yaml").optimizer.beta is None
    old = OmegaConf.to_container(cfg)
    old["optimizer"]["beta"] = 0.9
    assert config_from_dict(old, source="config in checkpoint 8").optimizer.beta is None
    with pytest.raises(ConfigError, match=NO_BETA.format(0.5)):
        config_from_dict(old, ["optimizer.beta=0.5"])


@pytest.mark.parametrize("value, message", [
    ("0,1;1,2", r"names rank\(s\) \[1\] more than once"),
    ("0,1,2;3", r"differ in size \(3, 1 workers"),
    ("0,-1;2,3", r"has rank -1: ranks are the workers' hvd\.rank\(\), 0 and up"),
    ("0,1;", r"use null, host, or groups of ranks separated by ';'"),
])
def test_bad_hierarchy_is_a_config_error_before_launch(tmp_path, capsys, value, message):
    """What hvd_easgd.optim.hierarchy.check_groups refuses whatever the world size is refused by the
    config, so hvd-easgd-train exits 2 before any worker starts (not a traceback on every rank)."""
    from hvd_easgd.train.config import parse_hierarchy
    from hvd_easgd.train.cli import main

    recipe = write(tmp_path / "r.yaml", MINIMAL)
    prefix = re.escape(f"'optimizer.hierarchy' is {value!r}")
    with pytest.raises(ConfigError, match=f"^{prefix}.*{message}"):
        load_config(recipe, [f"optimizer.hierarchy={value}"])
    assert main(["--config", str(recipe), "--set", f"optimizer.hierarchy={value}",
                 "--print-config"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert parse_hierarchy("1,0;3,2") == [[0, 1], [2, 3]]
    assert load_config(recipe, ["optimizer.hierarchy=0,2;1,3"]).optimizer.hierarchy == "0,2;1,3"


def test_config_imports_no_horovod():
    """hvd_easgd.train.config (recipes, --print-config, sweeps) loads a recipe without Horovod."""
    code = ("import sys; from hvd_easgd.train.config import load_config; "
            "load_config('recipes/demo/digits_diloco.yaml'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'horovod', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_trainers_methods_are_the_algorithms_plus_its_own():
    """config.py spells the algorithm's names to load without torch: they must be the
    algorithm's, and every trainer method must run on one of them or be the trainer's own."""
    import hvd_easgd.optim as optim
    from hvd_easgd.train import config

    assert config.ALGORITHM_METHODS == tuple(optim.METHODS)
    assert config.MODES == tuple(optim.MODES)
    assert config.CENTER_AVERAGES == tuple(optim.CENTER_AVERAGES)
    for name, (method, _, average) in config.ELASTIC_METHODS.items():
        assert method in optim.METHODS and average in (None, *optim.CENTER_AVERAGES), name
    assert set(config.METHODS) == {*config.ELASTIC_METHODS, config.SYNC_METHOD,
                                   *config.SINGLE_WORKER_METHODS}
