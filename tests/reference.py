"""Single-process reference of the EASGD semantics (issues 3 and 4), written from the spec text.

p simulated workers, each with its own copy of the model, its own ``torch.optim.SGD`` and its
own deterministic data, plus one center. Nothing here imports ``hvd_easgd``: the tests compare the
real multi-process wrapper against this file.

The semantics implemented (steps are counted from 1, a round happens at steps tau, 2*tau, ...,
counted from the end of the warm-up when Case.extra["sync_sgd_steps"] = W > 0):

warm-up (steps 1..W): every worker's gradient on its own batch; the gradients are averaged over
    the workers and every worker takes the same local step (synchronous SGD); c <- x.
one worker (p = 1, a fresh job or what an elastic shrink leaves): alpha = 0, beta = 1 for
    EASGD (the worker is not pulled, the center takes y); async mode is sync with one worker.
membership changes (ElasticReference): a shrink drops the highest ranks, the survivors keep
    their parameters and local optimizer state; a joiner starts at c with a fresh optimizer.

sync, method="easgd":
    y_i = x_i before the local update (where the gradient was taken); local update;
    x_i <- x_i - alpha*(y_i - c);  c <- c + beta*(mean_i y_i - c)   (same c in both: the old one)
sync, method="downpour":
    local update; d_i = x_i - c; c <- c + sum_i d_i; x_i <- c
sync, method="mdownpour":
    DOWNPOUR with Nesterov momentum on the master (PyTorch's Nesterov form, u = sum_i d_i is the
    master's step direction):  v <- m*v + u;  c <- c + u + m*v;  x_i <- c
sync, method="average":
    local update; c <- mean_i x_i; x_i <- c
async, method="easgd" (delayed apply):
    at round k: snapshot y_k (before the local update); local update; if round k-1 is pending,
    apply it now: x_i <- x_i - alpha*(y_{k-1,i} - c); c <- c + beta*(mean_i y_{k-1,i} - c)
    (c = the center at APPLY time); then round k becomes pending. ``synchronize()`` applies the
    pending round.
async, pulling methods (downpour, mdownpour, average), same delayed pattern:
    at round k: local update; if round k-1 is pending, apply it: c_new from the rule above with
    the pending d's, x_i <- x_i + (c_new - c) - d_{k-1,i} (restart from the new center, keeping
    the progress made since the snapshot), c <- c_new; THEN snapshot d_{k,i} = x_i - c (after the
    correction, so d is the worker's progress since its last pull). In sync mode this is exactly
    the sync rule (x_i still equals its snapshot, so x_i lands on c_new).
center averaging (evaluated model), updated after every center update (r = rounds applied):
    "running": a_0 = c_0, a_r = a_{r-1} + (c_r - a_{r-1}) / (r + 1)
    "moving":  a <- a + rate*(c - a)
named buffers (BatchNorm statistics), if enabled: at a round, floating buffers <- mean over
    workers (sync only). Sync EASGD with p > 1 and start_early (the default) sends them as they
    were when the step before the round step ended (before its forward), and each worker keeps
    its own change since: b_i <- b_i - b_sent,i + mean_j b_sent,j. The first round of a run
    with tau = 1 has no step before it and sends them after its forward.

The model, data and optimizer builders are shared with the worker scripts so both sides train
exactly the same problem.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

# --------------------------------------------------------------------------------------------
# The problem: model, data, optimizer (shared with tests/workers/opt_*.py)
# --------------------------------------------------------------------------------------------

IN_DIM, HID_DIM, OUT_DIM, BATCH = 6, 8, 3, 8


@dataclass
class Case:
    """One training configuration; the worker and the reference both build from it."""

    name: str = "case"
    method: str = "easgd"
    mode: str = "sync"
    opt: str = "sgd"  # "sgd" (plain + weight decay) or "nesterov" (momentum 0.99, EAMSGD)
    model: str = "mlp"  # "mlp" or "bn" (with BatchNorm1d)
    tau: int = 3
    steps: int = 10
    seed: int = 0
    beta: Optional[float] = 0.9
    alpha: Optional[float] = None
    center_average: Optional[str] = None  # None, "running" or "moving"
    average_rate: float = 0.1
    master_momentum: float = 0.9  # mdownpour only
    buffers: bool = False  # pass named_buffers to the wrapper
    compression: str = "none"  # "none" or "fp16"
    extra: Dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Case":
        return Case(**d)


def build_model(case: Case, rank: int = 0) -> nn.Module:
    """Rank-dependent initialisation: the wrapper must broadcast rank 0's parameters."""
    torch.manual_seed(case.seed * 7919 + rank * 104729 + 1)
    if case.model == "mlp":
        model = nn.Sequential(nn.Linear(IN_DIM, HID_DIM), nn.Tanh(), nn.Linear(HID_DIM, OUT_DIM))
    elif case.model == "bn":
        model = nn.Sequential(
            nn.Linear(IN_DIM, HID_DIM), nn.BatchNorm1d(HID_DIM), nn.Tanh(),
            nn.Linear(HID_DIM, OUT_DIM),
        )
    else:
        raise ValueError(case.model)
    model.train()
    return model


def build_optimizer(case: Case, params) -> torch.optim.Optimizer:
    if case.opt == "sgd":
        return torch.optim.SGD(params, lr=0.05, weight_decay=1e-2)
    if case.opt == "nesterov":
        return torch.optim.SGD(params, lr=0.01, momentum=0.99, nesterov=True, weight_decay=1e-3)
    if case.opt == "adamw":  # DiLoCo's inner optimizer (tests/optim/test_outer.py)
        return torch.optim.AdamW(params, lr=0.01, weight_decay=1e-2)
    raise ValueError(case.opt)


def make_batch(case: Case, rank: int, step: int):
    """Deterministic per-(seed, rank, step) batch; ranks see different data."""
    g = torch.Generator().manual_seed(case.seed * 1_000_003 + rank * 10_007 + step)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    y = torch.randn(BATCH, OUT_DIM, generator=g) + 0.5 * (rank + 1)
    return x, y


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def local_backward(model: nn.Module, opt, case: Case, rank: int, step: int) -> float:
    """One worker's forward/backward for step ``step`` (counted from 1)."""
    opt.zero_grad()
    loss = loss_fn(model, make_batch(case, rank, step))
    loss.backward()
    return float(loss.detach())


def float_buffers(model: nn.Module):
    return [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def flat(tensors) -> List[float]:
    return [float(v) for t in tensors for v in t.detach().reshape(-1).tolist()]


def landing_steps(case: Case) -> List[int]:
    """The steps at whose end a good exchange has moved the center (p > 1): every
    synchronous-SGD step (``extra["sync_sgd_steps"]``), then every round step in sync mode, or
    every round step after the first in async mode (a round lands at the next one)."""
    warmup = min(int(case.extra.get("sync_sgd_steps", 0)), case.steps)
    rounds = [t for t in range(warmup + 1, case.steps + 1) if (t - warmup) % case.tau == 0]
    return list(range(1, warmup + 1)) + (rounds if case.mode == "sync" else rounds[1:])


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


class Reference:
    """p simulated workers following the spec exactly."""

    def __init__(self, case: Case, p: int):
        self.case, self.p = case, p
        if case.method not in ("easgd", "downpour", "mdownpour", "average"):
            raise ValueError(case.method)
        if case.mode not in ("sync", "async"):
            raise ValueError(case.mode)
        self.set_world(p)
        base = build_model(case, rank=0)
        self.models = [copy.deepcopy(base) for _ in range(p)]
        self.opts = [build_optimizer(case, m.parameters()) for m in self.models]
        self.center = [t.detach().clone() for t in base.parameters()]
        self.avg_center = [t.clone() for t in self.center] if case.center_average else None
        self.master_v = [torch.zeros_like(t) for t in self.center]
        self.steps = 0
        self.rounds = 0  # rounds started (snapshots taken)
        self.applied = 0  # rounds whose center update has been applied
        self.pending = None  # async: (per-worker y list, mean list)
        self.losses: List[List[float]] = [[] for _ in range(p)]

    def set_world(self, p: int) -> None:
        """The coefficients for ``p`` workers: symmetric for p >= 2, (0, 1) for one."""
        case = self.case
        self.p = p
        if p == 1:
            self.alpha, self.beta = 0.0, 1.0
        elif case.alpha is not None:
            self.alpha, self.beta = case.alpha, p * case.alpha
        else:
            self.alpha, self.beta = case.beta / p, case.beta

    @property
    def warmup(self) -> int:
        return int(self.case.extra.get("sync_sgd_steps", 0))

    def is_round(self, t: int) -> bool:
        return t > self.warmup and (t - self.warmup) % self.case.tau == 0

    # -- helpers --
    def _params(self, i):
        return list(self.models[i].parameters())

    def _update_average(self):
        case = self.case
        if case.center_average is None:
            return
        for a, c in zip(self.avg_center, self.center):
            if case.center_average == "running":
                a.add_((c - a) / (self.applied + 1))
            elif case.center_average == "moving":
                a.add_(case.average_rate * (c - a))
            else:
                raise ValueError(case.center_average)

    @staticmethod
    def _mean(list_of_lists):
        return [torch.stack(ts).sum(0) / len(ts) for ts in zip(*list_of_lists)]

    def _apply_easgd(self, ys, mean):
        with torch.no_grad():
            for i in range(self.p):
                for x, y, c in zip(self._params(i), ys[i], self.center):
                    x.sub_(self.alpha * (y - c))
            for c, m in zip(self.center, mean):
                c.add_(self.beta * (m - c))
        self.applied += 1
        self._update_average()

    def _buffers_sent_early(self, t: int) -> bool:
        """Whether round step t's buffers go before its forward (Rounds.start_early)."""
        case = self.case
        return (case.buffers and case.mode == "sync" and case.method == "easgd"
                and case.extra.get("start_early", True) and self.p > 1 and t > 1
                and self.is_round(t))

    def _float_buffers(self):
        return [[b.detach().clone() for _, b in float_buffers(m)] for m in self.models]

    def _average_buffers(self, sent=None):
        """Buffers <- the workers' mean of ``sent`` plus each worker's change since it."""
        if not self.case.buffers:
            return
        live = [[b for _, b in float_buffers(m)] for m in self.models]
        sent = self._float_buffers() if sent is None else sent
        means = self._mean(sent)
        with torch.no_grad():
            for bs, ss in zip(live, sent):
                for b, s, m in zip(bs, ss, means):
                    b.add_(m - s)

    # -- the algorithm --
    def _backward(self, i: int, t: int) -> float:
        """Worker i's gradient for step t (HierReference: its group's average)."""
        return local_backward(self.models[i], self.opts[i], self.case, i, t)

    def _sync_sgd_step(self, t: int) -> None:
        grads = []
        for i in range(self.p):
            self.losses[i].append(self._backward(i, t))
            grads.append([x.grad.clone() for x in self._params(i)])
        mean = self._mean(grads)
        for i in range(self.p):
            for x, g in zip(self._params(i), mean):
                x.grad = g.clone()
            self.opts[i].step()
        with torch.no_grad():
            for c, x in zip(self.center, self._params(0)):
                c.copy_(x)

    def step(self):
        self.steps += 1
        t = self.steps
        if t <= self.warmup:
            return self._sync_sgd_step(t)
        is_round = self.is_round(t)
        sent_buffers = self._float_buffers() if self._buffers_sent_early(t) else None
        ys = []
        for i in range(self.p):
            self.losses[i].append(self._backward(i, t))
            ys.append([x.detach().clone() for x in self._params(i)])
            self.opts[i].step()
        if not is_round:
            return
        self.rounds += 1
        method, mode = self.case.method, self.case.mode
        if mode == "sync" or self.p == 1:
            if method == "easgd":
                self._apply_easgd(ys, self._mean(ys))
            else:
                self._sync_pull(method)
            self._average_buffers(sent_buffers)
            return
        # async
        if method == "easgd":
            if self.pending is not None:
                self._apply_easgd(*self.pending)
            self.pending = (ys, self._mean(ys))
            return
        if self.pending is not None:
            self._apply_pull(self.pending)
        # snapshot AFTER the pending correction: d = the worker's progress since its last pull
        self.pending = [[x.detach() - c for x, c in zip(self._params(i), self.center)]
                        for i in range(self.p)]

    def _new_center(self, ds):
        """The pulling methods' center update from the workers' differences d_i = x_i - c."""
        method = self.case.method
        if method == "average":
            return self._mean([[c + d for c, d in zip(self.center, di)] for di in ds])
        # sum_i d_i computed as p * mean_i(d_i): the allreduce of the accumulated updates
        u = [m * self.p for m in self._mean(ds)]
        if method == "downpour":
            return [c + ui for c, ui in zip(self.center, u)]
        mu = self.case.master_momentum  # mdownpour
        new_c = []
        for c, ui, v in zip(self.center, u, self.master_v):
            v.mul_(mu).add_(ui)
            new_c.append(c + ui + mu * v)
        return new_c

    def _sync_pull(self, method):
        """Sync: every worker restarts from the new center."""
        ds = [[x.detach() - c for x, c in zip(self._params(i), self.center)] for i in range(self.p)]
        with torch.no_grad():
            new_c = self._new_center(ds)
            for c, n in zip(self.center, new_c):
                c.copy_(n)
            for i in range(self.p):
                for x, c in zip(self._params(i), self.center):
                    x.copy_(c)
        self.applied += 1
        self._update_average()

    def _apply_pull(self, ds):
        """Async, tau steps late: restart from the new center but keep the local progress made
        since the snapshot: x <- x + (c_new - c_old) - d."""
        with torch.no_grad():
            new_c = self._new_center(ds)
            for i in range(self.p):
                for x, c, n, d in zip(self._params(i), self.center, new_c, ds[i]):
                    x.add_((n - c) - d)
            for c, n in zip(self.center, new_c):
                c.copy_(n)
        self.applied += 1
        self._update_average()

    def synchronize(self):
        if self.pending is not None:
            if self.case.method == "easgd":
                self._apply_easgd(*self.pending)
            else:
                self._apply_pull(self.pending)
            self.pending = None

    def run(self, steps: Optional[int] = None, synchronize: bool = True) -> "Reference":
        for _ in range(self.case.steps if steps is None else steps):
            self.step()
        if synchronize:
            self.synchronize()
        return self

    def result(self) -> dict:
        out = {
            "params": [flat(self._params(i)) for i in range(self.p)],
            "center": flat(self.center),
            "steps": self.steps,
            "rounds": self.rounds,
            "losses": self.losses,
        }
        if self.avg_center is not None:
            out["avg_center"] = flat(self.avg_center)
        if self.case.buffers:
            out["buffers"] = [flat(b for _, b in float_buffers(m)) for m in self.models]
        return out


def reference_result(case: Case, p: int) -> dict:
    return Reference(case, p).run().result()


class ElasticReference(Reference):
    """:class:`Reference` whose number of workers changes after given steps (sync mode).

    ``schedule``: ``[(after_step, p), ...]``. Shrinking drops the highest ranks (their data
    with them); the survivors keep their parameters and optimizer state. Growing adds workers
    at the center with a fresh local optimizer. Worker i reads ``make_batch(case, i, t)``.
    """

    def __init__(self, case: Case, p: int, schedule):
        super().__init__(case, p)
        self.schedule = dict(schedule)

    def step(self):
        super().step()
        p = self.schedule.get(self.steps)
        if p is None or p == self.p:
            return
        if p < self.p:
            del self.models[p:], self.opts[p:], self.losses[p:]
        while len(self.models) < p:
            model = copy.deepcopy(self.models[0])
            with torch.no_grad():
                for x, c in zip(model.parameters(), self.center):
                    x.copy_(c)
            self.models.append(model)
            self.opts.append(build_optimizer(self.case, model.parameters()))
            self.losses.append([])
        self.set_world(p)


def max_abs_diff(a: List[float], b: List[float]) -> float:
    assert len(a) == len(b), f"length {len(a)} != {len(b)}"
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def assert_rank_matches(case: "Case", np_: int, r: int, res: dict, ref: dict, tol: float) -> None:
    """One rank's result against the reference: local params, center, counters, averaged
    center, and the floating buffers (BatchNorm statistics) when the case passes them."""
    d = max_abs_diff(res["params"], ref["params"][r])
    assert d < tol, f"{case.name} np={np_}: rank {r} local params differ by {d}"
    d = max_abs_diff(res["center"], ref["center"])
    assert d < tol, f"{case.name} np={np_}: rank {r} center differs by {d}"
    assert res["counters"] == {"steps": ref["steps"], "rounds": ref["rounds"]}
    if case.center_average:
        d = max_abs_diff(res["avg_center"], ref["avg_center"])
        assert d < tol, f"{case.name}: averaged center differs by {d}"
    if case.buffers and case.mode == "sync":  # BatchNorm statistics (the reference's are sync)
        d = max_abs_diff(res["buffers"], ref["buffers"][r])
        assert d < tol, f"{case.name} np={np_}: rank {r} buffers differ by {d}"


# --------------------------------------------------------------------------------------------
# Outer optimizers (issue 12): the center moved by a torch.optim optimizer, DiLoCo
# --------------------------------------------------------------------------------------------
#
# The outer gradient of a round is g = c - mean_i x_i (x_i: the snapshot the method uses); the
# center takes one step of the outer optimizer (built over the center's tensors) on it.
#   method="easgd" + outer:  x_i <- x_i - alpha*(y_i - c)  (old c);  c <- outer step on g(y)
#   method="diloco":         local update; c <- outer step on g(x); x_i <- c (sync), or, async,
#                            x_i <- x_i + (c_new - c_old) - d_i as for the other pulling methods.
# Case.extra["outer_optimizer"] names one of OUTER_FACTORIES (default "nesterov").

OUTER_FACTORIES = {
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True),
    "sgd-beta": lambda ps: torch.optim.SGD(ps, lr=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


class OuterReference(Reference):
    """:class:`Reference` whose center update is an outer optimizer's step."""

    def __init__(self, case: Case, p: int):
        proxy = Case.from_dict({**case.to_dict(), "beta": case.beta or 0.9,
                                "method": "average" if case.method == "diloco" else case.method})
        super().__init__(proxy, p)
        self.case = case
        self.outer = OUTER_FACTORIES[case.extra.get("outer_optimizer", "nesterov")](self.center)

    def _outer_step(self, grads):
        with torch.no_grad():
            for c, g in zip(self.center, grads):
                c.grad = g
            self.outer.step()
            for c in self.center:
                c.grad = None

    def _apply_easgd(self, ys, mean):
        with torch.no_grad():
            for i in range(self.p):
                for x, y, c in zip(self._params(i), ys[i], self.center):
                    x.sub_(self.alpha * (y - c))
        self._outer_step([c - m for c, m in zip(self.center, mean)])
        self.applied += 1
        self._update_average()

    def _new_center(self, ds):
        """The new center from d_i = x_i - c (the center itself is left as it was)."""
        assert self.case.method == "diloco"
        old = [c.clone() for c in self.center]
        self._outer_step([-m for m in self._mean(ds)])
        new = [c.clone() for c in self.center]
        with torch.no_grad():
            for c, o in zip(self.center, old):
                c.copy_(o)
        return new


def outer_reference_result(case: Case, p: int) -> dict:
    return OuterReference(case, p).run().result()


# --------------------------------------------------------------------------------------------
# Hierarchical EASGD (issue 12): groups train as synchronous SGD, EASGD among the groups
# --------------------------------------------------------------------------------------------
#
# groups: lists of global ranks, all of one size n. Group k keeps ONE model and one local
# optimizer; at step t its gradient is the mean over its members r of the gradient on
# make_batch(case, r, t) (the group's synchronous SGD). Every tau steps the m groups do the
# round of case.method among themselves with alpha = beta / m (p = m above). Every member of a
# group holds the group's model, so rank r's expected params are those of its group.


class HierReference(Reference):
    def __init__(self, case: Case, groups: List[List[int]]):
        self.groups = [sorted(g) for g in groups]
        super().__init__(case, len(self.groups))

    def _backward(self, i: int, t: int) -> float:
        model, opt = self.models[i], self.opts[i]
        total, losses = None, []
        for r in self.groups[i]:
            opt.zero_grad()
            loss = loss_fn(model, make_batch(self.case, r, t))
            loss.backward()
            losses.append(float(loss.detach()))
            grads = [p.grad.clone() for p in model.parameters()]
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        for p, g in zip(model.parameters(), total):
            p.grad = g / len(self.groups[i])
        return losses[0]

    def rank_params(self, rank: int) -> List[float]:
        group = next(i for i, g in enumerate(self.groups) if rank in g)
        return flat(self._params(group))


class HierOuterReference(HierReference, OuterReference):
    """Hierarchical DiLoCo: the groups' round moves the center by an outer optimizer."""
