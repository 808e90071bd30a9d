"""benchmarks/protocol.py: the splits, the rate selection (validation only), the
noise-aware verdicts, and the --quick variant end to end (it starts its own horovodrun job)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import protocol as A
from tests.hvdrun import REPO, worker_env

VERDICTS = {"held", "did not hold", "inside the noise", "not measured"}


def test_validation_is_carved_from_training_and_noise_only_hits_training_labels():
    plain_train, plain_val, test = A.split_task(A.TASKS["digits"])
    assert (len(plain_train), len(plain_val), len(test)) == (1149, 288, 360)
    train, val, test2 = A.split_task(A.TASKS["digits-hard"])
    assert len(train) == 300 and torch.equal(val.tensors[1], plain_val.tensors[1])
    assert torch.equal(test.tensors[0], test2.tensors[0])
    rows = lambda ds: {tuple(x.flatten().tolist()) for x in ds.tensors[0]}  # noqa: E731
    assert not rows(plain_train) & rows(plain_val)  # no validation image is trained on
    assert not rows(plain_val) & rows(test)  # and the test set is not the validation set
    # 40 % label noise on the training part: compare with the clean labels of the same images
    clean = {tuple(x.flatten().tolist()): int(y) for x, y in zip(*plain_train.tensors)}
    flipped = [clean[tuple(x.flatten().tolist())] != int(y) for x, y in zip(*train.tensors)]
    assert 0.3 < sum(flipped) / len(flipped) < 0.5


def run(method, tau, lr, val, test, seconds, chosen=True, workers=2, seed=0, diverged=False):
    history = [{"seconds": s, "steps": 10 * i, "val_error": v, "test_error": e}
               for i, (s, v, e) in enumerate(zip(seconds, val, test))]
    return {"task": "digits", "workers": workers, "method": method, "tau": tau, "lr": lr,
            "seed": seed, "diverged": diverged, "history": history, "chosen": chosen,
            "phase": "grid" if seed == 0 else "seed", "val_score": 0.0}


def test_selection_uses_the_validation_error_never_the_test_error():
    good_val = run("easgd", 4, 0.1, [0.5, 0.1, 0.1, 0.1], [0.5, 0.4, 0.4, 0.4], [0, 1, 2, 3])
    good_test = run("easgd", 4, 0.3, [0.5, 0.3, 0.3, 0.3], [0.5, 0.0, 0.0, 0.0], [0, 1, 2, 3])
    assert min([good_test, good_val], key=A.selection_score) is good_val
    assert A.selection_score(dict(good_val, diverged=True)) == float("inf")


def test_the_grid_grows_past_an_edge_that_wins_and_stops_inside():
    top = [run("easgd", 4, lr, [0.5, v, v, v], [0.5] * 4, [0, 1, 2, 3])
           for lr, v in ((0.1, 0.3), (0.3, 0.2), (0.9, 0.1))]
    assert A.next_rate(top) == pytest.approx(2.7)
    assert A.next_rate(top[::-1][:1] + top[:2]) == pytest.approx(2.7)  # order does not matter
    bottom = [dict(r, lr=lr) for r, lr in zip(top, (0.9, 0.3, 0.1))]
    assert A.next_rate(bottom) == pytest.approx(0.1 / 3)
    inside = [dict(top[0], lr=0.1), dict(top[2], lr=0.5), dict(top[0], lr=0.9)]
    assert A.best_of(inside)["lr"] == 0.5 and A.next_rate(inside) is None
    # a diverged best (all diverged) extends nothing; a tie goes to the smaller rate
    assert A.next_rate([dict(r, diverged=True) for r in top]) is None
    tie = [dict(top[2], lr=0.9), dict(top[2], lr=0.3)]
    assert A.best_of(tie)["lr"] == 0.3 and A.next_rate(tie) == pytest.approx(0.1)


def test_compare_counts_only_differences_beyond_the_noise():
    assert A.compare([0.10, 0.11, 0.09], [0.30, 0.31, 0.29]) == "lower"
    assert A.compare([0.10, 0.30, 0.20], [0.15, 0.35, 0.05]) == "noise"
    assert A.compare([0.100], [0.101], floor=1 / 360) == "noise"  # under one test image
    assert A.compare([1.0, 2.0], [None, None]) == "lower"  # the other never got there
    assert A.compare([1.0, None], [2.0, 2.1]) == "noise"
    assert A.verdict_of(["lower", "noise"], "lower") == "inside the noise"
    assert A.verdict_of(["lower", "higher"], "lower") == "did not hold"


def findings_for(downpour_hi):
    """Three seeds per configuration; EASGD/EAMSGD flat in tau, DOWNPOUR at tau 64 given."""
    runs = []
    for seed, jitter in enumerate((0.0, 0.01, -0.01)):
        for m in ("easgd", "eamsgd", "downpour"):
            for tau in (1, 64):
                final = downpour_hi if (m, tau) == ("downpour", 64) else 0.05
                runs.append(run(m, tau, 0.1, [0.5, 0.1], [0.5, final + jitter], [0, 1],
                                seed=seed))
    summary = A.summarise(runs)
    settings = A.ProtocolSettings(steps=10, eval_every=10, batch=8, seeds=3, taus=(1, 64),
                                  methods=("easgd", "eamsgd", "downpour"), tasks=("digits",),
                                  grid_size=1, grid_extend=0)
    return {f["claim"]: f for f in A.protocol_findings(summary, settings, [2])}


def test_stability_claim_held_only_when_downpour_degrades_beyond_the_noise():
    claim = "EASGD/EAMSGD stable as tau grows while DOWNPOUR degrades"
    assert findings_for(0.40)[claim]["verdict"] == "held"
    assert findings_for(0.055)[claim]["verdict"] == "inside the noise"
    assert findings_for(0.01)[claim]["verdict"] == "did not hold"


@pytest.mark.timeout(400)
def test_quick_protocol_end_to_end(tmp_path):
    out, png = tmp_path / "protocol.json", tmp_path / "protocol.png"
    proc = subprocess.run(
        [sys.executable, "benchmarks/protocol.py", "--quick",
         "--json", str(out), "--png", str(png)], cwd=str(REPO), env=worker_env(),
        capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads(out.read_text())
    cfg, runs = payload["config"], payload["runs"]
    assert cfg["taus"] == [1, 16] and cfg["workers"] == [2] and cfg["seeds"] == 2
    configs = {(r["method"], r["tau"]) for r in runs}
    expected = {("sgd", None)} | {(m, t) for m in cfg["methods"] if m != "sgd" for t in (1, 16)}
    assert configs == expected and set(A.PROTOCOL_METHODS) <= set(cfg["methods"])
    for method, tau in configs:
        mine = [r for r in runs if (r["method"], r["tau"]) == (method, tau)]
        grid = [r for r in mine if r["phase"] == "grid"]
        first = list(A.LR_GRID[method][:2])
        assert [r["lr"] for r in grid[:2]] == pytest.approx(first)
        if len(grid) == 3:  # --quick extends once, past the edge that won the first two
            won = A.best_of(grid[:2])
            assert not won["diverged"]
            assert grid[2]["lr"] == pytest.approx(won["lr"] * (3 if won["lr"] == max(first)
                                                               else 1 / 3))
        else:
            assert len(grid) == 2 and A.next_rate(grid) is None
        chosen = min(grid, key=lambda r: (r["val_score"], r["lr"]))
        assert [r for r in grid if r.get("chosen")] == [chosen]  # by validation alone
        assert [(r["seed"], r["lr"]) for r in mine if r["phase"] == "seed"] == [(1, chosen["lr"])]
        for r in mine:
            assert [h["steps"] for h in r["history"]] == [0, 8, 16, 24] or r["diverged"]
    # the same initialisation for every run: the same initial center errors
    assert len({(r["history"][0]["val_error"], r["history"][0]["test_error"]) for r in runs}) == 1
    assert {f["verdict"] for f in payload["findings"]} <= VERDICTS and payload["findings"]
    assert "### The paper's claims, here" in proc.stdout
    assert (tmp_path / "protocol_digits-hard.png").stat().st_size > 10_000
