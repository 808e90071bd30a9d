"""The round math against the formulas of ../shared/PAPER.md, in one process and in seconds.

The rule classes are called directly as p simulated workers would call them (each with its own
replica of the center, all receiving the same sum of differences), and the expected values are
written from the paper's equations, not from the code. The round schedule and the non-finite
window are checked on a real optimizer with Horovod at size 1 in this process.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional, Sequence

import pytest
import torch

from hvd_easgd.optim import CENTER_AVERAGES, METHODS
from hvd_easgd.optim.rules import ElasticRule, buffer_rule, update_center_average

F64 = torch.float64  # exact enough to compare formulas at 1e-12

P_VALUES = (2, 3, 5)


def read(name: str) -> str:
    """``name`` as a new string object, as a YAML recipe or the command line hands it over: the
    code must compare names by value, not by the identity of its own literals."""
    return "".join(list(name))


def workers(p: int, n: int = 6, seed: int = 0) -> List[torch.Tensor]:
    """p distinct worker parameter vectors."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=F64) for _ in range(p)]


class SimulatedRound:
    """One round of `rule` over p workers, as Horovod would run it: each worker sends
    d_i = snapshot_i - c, receives the sum, applies the rule to its own center replica."""

    def __init__(self, rule: ElasticRule, center: torch.Tensor,
                 velocity: Optional[torch.Tensor] = None) -> None:
        self.rule = rule
        self.center = center
        self.velocity = velocity

    def run(self, snapshots: Sequence[torch.Tensor],
            params: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Apply the round; return each worker's new parameters (``params`` default to the
        snapshots, as in sync mode). Every worker's center replica must agree."""
        params = snapshots if params is None else params
        total = sum(s - self.center for s in snapshots)
        new_params, centers, velocities = [], [], []
        for snapshot, x in zip(snapshots, params):
            center = self.center.clone()
            velocity = None if self.velocity is None else self.velocity.clone()
            diff = snapshot - center
            scale = self.rule.apply(center, diff, total.clone(), velocity)
            new_params.append(x + scale * diff)
            centers.append(center)
            velocities.append(velocity)
        for center in centers[1:]:
            assert torch.equal(center, centers[0]), "center replicas diverged"
        self.center = centers[0]
        self.velocity = velocities[0]
        return new_params


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- EASGD (eqs. 5-6)

@pytest.mark.parametrize("p", P_VALUES)
def test_easgd_round_is_eqs_5_and_6_with_symmetric_force(p):
    alpha = 0.9 / p
    x, c = workers(p), torch.linspace(-1, 1, 6, dtype=F64)
    rnd = SimulatedRound(ElasticRule(read("easgd"), alpha=alpha, world_size=p), c.clone())
    new = rnd.run(x)
    for xi, ni in zip(x, new):
        assert close(ni, xi - alpha * (xi - c))  # eq. 5 without the gradient term
    beta = p * alpha
    assert close(rnd.center, (1 - beta) * c + beta * torch.stack(x).mean(0))  # eq. 6


@pytest.mark.parametrize("p", P_VALUES)
def test_easgd_takes_a_beta_given_apart_from_alpha(p):
    alpha, beta = 0.05, 0.5
    x, c = workers(p, seed=1), torch.zeros(6, dtype=F64)
    rule = ElasticRule(read("easgd"), alpha=alpha, world_size=p, beta=beta)
    rnd = SimulatedRound(rule, c.clone())
    new = rnd.run(x)
    assert close(rnd.center, (1 - beta) * c + beta * torch.stack(x).mean(0))
    for xi, ni in zip(x, new):
        assert close(ni, xi - alpha * (xi - c))


def test_easgd_lone_worker_alpha_0_beta_1_leaves_plain_sgd():
    x, c = workers(1, seed=2), torch.ones(6, dtype=F64)
    rnd = SimulatedRound(ElasticRule(read("easgd"), alpha=0.0, world_size=1, beta=1.0), c.clone())
    [new] = rnd.run(x)
    assert torch.equal(new, x[0])
    assert close(rnd.center, x[0])


def test_easgd_two_rounds_compose():
    p, alpha = 3, 0.3
    x, c = workers(p, seed=3), torch.zeros(6, dtype=F64)
    rnd = SimulatedRound(ElasticRule(read("easgd"), alpha=alpha, world_size=p), c.clone())
    x1 = rnd.run(x)
    c1 = (1 - p * alpha) * c + p * alpha * torch.stack(x).mean(0)
    x2 = rnd.run(x1)
    assert close(rnd.center, (1 - p * alpha) * c1 + p * alpha * torch.stack(x1).mean(0))
    for xi, ni in zip(x1, x2):
        assert close(ni, xi - alpha * (xi - c1))


# ---------------------------------------------------------------------- the pulling methods

@pytest.mark.parametrize("p", P_VALUES)
def test_downpour_adds_every_accumulated_update_and_restarts_workers(p):
    x, c = workers(p, seed=4), torch.full((6,), 0.5, dtype=F64)
    rnd = SimulatedRound(ElasticRule(read("downpour"), alpha=1.0, world_size=p), c.clone())
    new = rnd.run(x)
    expected = c + sum(xi - c for xi in x)
    assert close(rnd.center, expected)
    for ni in new:
        assert close(ni, expected)


@pytest.mark.parametrize("p", P_VALUES)
def test_mdownpour_is_nesterov_momentum_on_the_master(p):
    m = 0.7
    c0 = torch.zeros(6, dtype=F64)
    rnd = SimulatedRound(ElasticRule(read("mdownpour"), alpha=1.0, world_size=p, master_momentum=m),
                         c0.clone(), velocity=torch.zeros(6, dtype=F64))
    x1 = workers(p, seed=5)
    rnd.run(x1)
    total1 = sum(xi - c0 for xi in x1)
    v1 = total1
    c1 = c0 + total1 + m * v1
    assert close(rnd.velocity, v1) and close(rnd.center, c1)
    x2 = [xi + c1 for xi in workers(p, seed=6)]
    new = rnd.run(x2)
    total2 = sum(xi - c1 for xi in x2)
    v2 = m * v1 + total2
    c2 = c1 + total2 + m * v2
    assert close(rnd.velocity, v2) and close(rnd.center, c2)
    for ni in new:
        assert close(ni, c2)


@pytest.mark.parametrize("p", P_VALUES)
def test_average_and_buffer_rule_land_every_worker_on_the_mean(p):
    x, c = workers(p, seed=7), torch.full((6,), -2.0, dtype=F64)
    for rule in (ElasticRule(read("average"), alpha=1.0 / p, world_size=p), buffer_rule(p)):
        rnd = SimulatedRound(rule, c.clone())
        new = rnd.run(x)
        mean = torch.stack(x).mean(0)
        assert close(rnd.center, mean)
        for ni in new:
            assert close(ni, mean)


@pytest.mark.parametrize("method", ["downpour", "average"])
def test_a_late_pull_keeps_the_local_progress_made_since_the_snapshot(method):
    """Async mode: the correction lands after more local steps; the worker ends at the new
    center plus what it learned since its snapshot."""
    p = 3
    snapshots, c = workers(p, seed=8), torch.zeros(6, dtype=F64)
    progress = workers(p, seed=9)
    rnd = SimulatedRound(ElasticRule(read(method), alpha=1.0 / p, world_size=p), c.clone())
    new = rnd.run(snapshots, params=[s + d for s, d in zip(snapshots, progress)])
    for ni, d in zip(new, progress):
        assert close(ni, rnd.center + d)


# ---------------------------------------------------------------------- flags and bad input

@pytest.mark.parametrize("method", ["easgd", "downpour", "mdownpour", "average"])
def test_what_each_method_snapshots_and_keeps(method):
    rule = ElasticRule(read(method), alpha=0.1, world_size=2)
    assert rule.snapshot_before_step == (method == "easgd")
    assert rule.needs_velocity == (method == "mdownpour")


def test_a_rule_is_immutable():
    """The round state owns the rule and rebuilds it when the world changes; nobody edits it."""
    rule = ElasticRule(read("easgd"), alpha=0.45, world_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.alpha = 0.9


def test_methods_and_center_averages_are_the_documented_ones():
    assert METHODS == ("easgd", "downpour", "mdownpour", "average", "diloco")
    assert CENTER_AVERAGES == ("running", "moving")


def test_diloco_and_unknown_methods_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match="OuterRule"):
        ElasticRule(read("diloco"), alpha=0.5, world_size=2)
    with pytest.raises(ValueError, match="unknown method 'sgd'; choose one of easgd"):
        ElasticRule(read("sgd"), alpha=0.5, world_size=2)


# ---------------------------------------------------------------------- center averages

def test_running_average_is_the_mean_of_all_centers_so_far():
    centers = [torch.full((4,), v, dtype=F64) for v in (3.0, -1.0, 4.0, 1.0, 5.0)]
    average = centers[0].clone()  # c_0
    for t, c in enumerate(centers[1:], start=1):
        update_center_average(average, c, read("running"), rounds=t, rate=0.5)
        assert close(average, torch.stack(centers[:t + 1]).mean(0)), t


def test_moving_average_folds_each_center_at_the_constant_rate():
    rate, average, expected = 0.001, torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64)
    for t, value in enumerate((1.0, 2.0, -3.0), start=1):
        c = torch.full((4,), value, dtype=F64)
        update_center_average(average, c, read("moving"), rounds=t, rate=rate)
        expected = (1 - rate) * expected + rate * c
        assert close(average, expected)


# ---------------------------------------------------------------------- size 1, in process

@pytest.fixture(scope="module")
def hvd1():
    import horovod.torch as hvd

    hvd.init()
    assert hvd.size() == 1
    return hvd


class OneParameter:
    """A one-tensor model and its EASGD optimizer (start_early off: a round's snapshot is taken
    at its own step, so a value planted before that step is what the round sends)."""

    def __init__(self, **kwargs) -> None:
        from hvd_easgd.optim import ElasticOptimizer

        self.param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float32))
        local = torch.optim.SGD([self.param], lr=0.1)
        self.opt = ElasticOptimizer(local, [("w", self.param)], start_early=False, **kwargs)

    def step(self, poison: bool = False, poison_gradient: bool = False) -> None:
        if poison:
            with torch.no_grad():
                self.param.fill_(float("nan"))
        self.param.grad = torch.full_like(self.param, float("nan") if poison_gradient else 1.0)
        self.opt.step()


@pytest.mark.parametrize("tau,sync_sgd_steps", [(1, 0), (3, 0), (4, 2), (2, 5)])
def test_rounds_come_every_tau_steps_after_the_switch_point(hvd1, tau, sync_sgd_steps):
    model = OneParameter(tau=tau, sync_sgd_steps=sync_sgd_steps)
    for step in range(1, 3 * tau + sync_sgd_steps + 2):
        model.step()
        assert model.opt.step_count == step
        expected = max(0, step - sync_sgd_steps) // tau
        assert model.opt.round_count == expected, f"step {step}"
        assert model.opt.stats.rounds == expected, f"step {step}"


@pytest.mark.parametrize("bad_rounds,stops_at", [
    ({1, 2}, 2),        # patience reached
    ({1, 4}, 4),        # 2 bad among the last 2 * patience = 4 rounds
    ({1, 5}, None),     # round 1 has left the window when round 5 is bad
    ({1, 3, 7}, 3),
    ({2, 6, 10}, None),
])
def test_nonfinite_rounds_stop_training_within_a_window_of_twice_the_patience(
        hvd1, bad_rounds, stops_at):
    from hvd_easgd.optim import NonFiniteError, NonFiniteWarning

    model = OneParameter(tau=1, nonfinite_patience=2)
    stopped = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        for r in range(1, 12):
            try:
                model.step(poison=r in bad_rounds)
            except NonFiniteError:
                stopped = r
                break
            assert torch.isfinite(model.param).all(), "a skipped round restarts from the center"
    assert stopped == stops_at
    skipped = {r for r in bad_rounds if stops_at is None or r <= stops_at}
    assert model.opt.stats.skipped_rounds == len(skipped)


def test_a_nonfinite_synchronous_sgd_step_is_applied_by_nobody_and_rank_0_says_so(hvd1):
    from hvd_easgd.optim import NonFiniteError, NonFiniteWarning

    model = OneParameter(tau=2, sync_sgd_steps=4, nonfinite_patience=2)
    model.step()
    before = model.param.detach().clone()
    with pytest.warns(NonFiniteWarning, match="synchronous SGD"):
        model.step(poison_gradient=True)
    assert torch.equal(model.param.detach(), before)
    assert model.opt.stats.skipped_rounds == 1
    with pytest.warns(NonFiniteWarning), pytest.raises(NonFiniteError, match="synchronous-SGD"):
        model.step(poison_gradient=True)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_lone_worker_rounds_at_once_in_either_mode(hvd1, mode):
    """p = 1 (alpha 0, beta 1): the center takes the worker's snapshot at the round step itself;
    a late (async) round would pull the center toward where the worker was tau steps ago."""
    model = OneParameter(tau=2, mode=mode)
    model.step()  # w = -0.1 (lr 0.1, gradient 1)
    model.step()  # round: EASGD's snapshot is taken before this step's update
    center = model.opt.center_state_dict()["w"]
    assert torch.allclose(center, torch.full_like(center, -0.1))
    assert torch.allclose(model.param.detach(), torch.full((4,), -0.2))
