"""A run directory written before the trainer was reorganised (tests/data/runs/) still resumes:
its step, center, optimizer counters and config come back, and training goes on to the end."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from hvd_easgd.train.metrics import read_metrics

OLD_RUN = Path(__file__).resolve().parents[1] / "data" / "runs" / "digits_80a6908"


def test_a_checkpoint_from_commit_80a6908_resumes(tmp_path):
    import horovod.torch as hvd

    from hvd_easgd.train.config import config_from_dict, diff_configs, load_config
    from hvd_easgd.train.factory import create_parts
    from hvd_easgd.train.resume import open_run
    from hvd_easgd.train.trainer import Trainer

    hvd.init()
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    # read with torch alone, not through the code under test
    saved = torch.load(run_dir / "checkpoints" / "ckpt-000000005.pt", weights_only=False)
    cfg = load_config(run_dir / "config.yaml")  # what `--resume --run-dir RUN` reads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same config, same world: nothing to warn about
        cfg, run_dir, state = open_run(cfg, run_dir, resume=True, rank=0)
    trainer = Trainer(cfg, create_parts(cfg, rank=0, size=1, local_rank=0, resume_state=state),
                      run_dir, state)
    try:
        assert (trainer.loop.step, trainer.loop.epoch, trainer.loop.epoch_samples) == (
            5, saved["epoch"], saved["epoch_samples"])
        assert trainer.opt.round_count == saved["rounds"] == 1
        center = trainer.center_state(averaged=False)
        assert set(center) == set(saved["center"])
        for name, value in saved["center"].items():
            assert torch.equal(center[name], value), name
        local = trainer.model.state_dict()
        assert not torch.equal(local["head.fc1.weight"], saved["center"]["head.fc1.weight"])
        for name, value in saved["workers"][0]["model"].items():
            assert torch.equal(local[name], value), name
        assert diff_configs(config_from_dict(saved["config"]), trainer.cfg) == ["run_dir"]
        assert trainer.cfg.run_dir == str(run_dir)
        summary = trainer.run()
    finally:
        trainer.close_outputs()
    assert summary["step"] == 8 and summary["total_steps"] == 8
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r] == [5, 8]
