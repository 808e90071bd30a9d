"""The digits benchmarks' shared parts: which optimizer each method is, and one training run.

``accuracy.py`` and ``protocol.py`` train ``digits_net`` on scikit-learn's digits inside a
Horovod job and compare methods by the error of the center (for ``sgd``: of the replicated
model). Both build every method through :func:`build_optimizer` and train through
:func:`train_run`, so a comparison differs only in what the comparison sets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from benchmarks.common import distribute

#: method -> (local optimizer, :func:`benchmarks.common.distribute`'s method)
METHODS = {
    "easgd": ("sgd", "easgd"),
    "eamsgd": ("sgd", "easgd"),       # the paper's EAMSGD: EASGD with local Nesterov momentum
    "downpour": ("sgd", "downpour"),
    "average": ("sgd", "average"),    # periodic model averaging ("local SGD")
    "sgd": ("sgd", "sgd"),             # hvd.DistributedOptimizer: synchronous SGD
    "mdownpour": ("sgd", "mdownpour"),
    "diloco": ("adamw", "diloco"),     # DiLoCo as published: local AdamW, outer Nesterov SGD
    "diloco-sgd": ("sgd", "diloco"),   # DiLoCo's outer step over local SGD
}
#: Learning rates from a grid search on digits at tau 1 and 16 (the grid: RESULTS.md); mdownpour,
#: diloco and diloco-sgd from smaller grids (protocol.py widens every grid by itself).
DEFAULT_LR = {"easgd": 0.2, "eamsgd": 0.005, "downpour": 0.1, "average": 0.2, "sgd": 0.05,
              "mdownpour": 0.001, "diloco": 0.003, "diloco-sgd": 0.2}
#: Local Nesterov momentum (MDOWNPOUR's momentum is on the center: ``MASTER_MOMENTUM``).
MOMENTUM = {"eamsgd": 0.99, "sgd": 0.9}
MASTER_MOMENTUM = 0.99
WEIGHT_DECAY = 1e-4
BETA = 0.9


def parse_lr(items: Sequence[str]) -> Dict[str, float]:
    """``DEFAULT_LR`` with ``METHOD=VALUE`` overrides."""
    lrs = dict(DEFAULT_LR)
    for item in items:
        method, sep, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if not sep or method not in METHODS or rate is None:
            raise SystemExit(f"--lr expects METHOD=VALUE with METHOD in {sorted(METHODS)} and "
                             f"VALUE a number, e.g. easgd=0.1; got {item!r}")
        lrs[method] = rate
    return lrs


def build_optimizer(method: str, tau: Optional[int], model: torch.nn.Module, lr: float):
    """``method``'s optimizer at learning rate ``lr``; every elastic method in sync mode, so
    that a comparison is about the algorithms, not about overlap on a shared machine."""
    local, wrapped = METHODS[method]
    if local == "adamw":
        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    else:
        momentum = MOMENTUM.get(method, 0.0)
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               nesterov=momentum > 0, weight_decay=WEIGHT_DECAY)
    extra: Dict[str, Any] = {} if wrapped in ("sgd", "diloco") else {"beta": BETA}
    if wrapped == "mdownpour":
        extra["master_momentum"] = MASTER_MOMENTUM
    return distribute(base, model, wrapped, tau, "sync", **extra)


@dataclass(frozen=True)
class Config:
    """A method at a tau (``None`` for ``sgd``, which has none)."""

    method: str
    tau: Optional[int]

    @property
    def name(self) -> str:
        return self.method if self.tau is None else f"{self.method}-tau{self.tau}"


def build_configs(methods: Sequence[str], taus: Sequence[int]) -> List[Config]:
    """``sgd`` once, every other method at every tau."""
    configs = [Config("sgd", None)] if "sgd" in methods else []
    for tau in taus:
        configs += [Config(m, tau) for m in methods if m != "sgd"]
    return configs


@dataclass(frozen=True)
class RunPlan:
    """One training run: the method and its rate, the seeds, the budget, the sets it is
    evaluated on (each a loader over the worker's share of a whole set)."""

    method: str
    tau: Optional[int]
    lr: float
    init_seed: int      # the model's initialisation (the same for every run compared)
    data_seed: int      # the order of the training data
    dropout_seed: int   # dropout's stream (plus the worker's rank)
    steps: int
    eval_every: int
    batch: int


@torch.no_grad()
def errors_on(model: torch.nn.Module, loaders: Sequence[Any]) -> Tuple[float, ...]:
    """Error on each whole set (its shares summed over the workers), in one allreduce."""
    model.eval()
    counts: List[int] = []
    for loader in loaders:
        wrong = total = 0
        for x, y in loader:
            wrong += int((model(x).argmax(1) != y).sum())
            total += len(y)
        counts += [wrong, total]
    model.train()
    got = hvd.allreduce(torch.tensor(counts, dtype=torch.float64), op=hvd.Sum,
                        name="digits.eval").tolist()
    return tuple(got[i] / got[i + 1] for i in range(0, len(got), 2))


def train_run(plan: RunPlan, train_set: Any, eval_loaders: Sequence[Any],
              num_classes: int = 10) -> Dict[str, Any]:
    """Train one run; its history of (training seconds, steps, error on each eval set), whether
    it diverged (a non-finite loss on any worker, or hvd_easgd's NonFiniteError) and the bytes
    this worker handed to Horovod (elastic methods; a sync EASGD round starts when the step
    before it ends, so the round after the last step may be among them)."""
    from hvd_easgd.train.data import train_loader
    from hvd_easgd.train.models import build_model

    torch.manual_seed(plan.init_seed)
    model = build_model("digits_net", num_classes, in_channels=1)
    center = build_model("digits_net", num_classes, in_channels=1)
    opt = build_optimizer(plan.method, plan.tau, model, plan.lr)
    loader = train_loader(train_set, plan.batch, rank=hvd.rank(), world_size=hvd.size(),
                          seed=plan.data_seed)
    torch.manual_seed(plan.dropout_seed + hvd.rank())
    elastic = METHODS[plan.method][1] != "sgd"

    def evaluate() -> Tuple[float, ...]:
        if not elastic:
            return errors_on(model, eval_loaders)
        center.load_state_dict(opt.center_state_dict(), strict=False)
        return errors_on(center, eval_loaders)

    history = [(0.0, 0, evaluate())]
    try:
        diverged = _train(model, opt, loader, plan, evaluate, history)
        sent = opt.stats.bytes_communicated if elastic else None
    finally:
        if elastic:
            opt.close()
    return {"method": plan.method, "tau": plan.tau, "lr": plan.lr, "diverged": diverged,
            "bytes_sent": sent,
            "history": [{"seconds": t, "steps": s, "errors": list(e)} for t, s, e in history]}


def _train(model, opt, loader, plan: RunPlan, evaluate, history: List[tuple]) -> bool:
    """``plan.steps`` steps, evaluating every ``plan.eval_every`` and at the end; True if the
    run diverged (then the last entry is chance-level error for every set)."""
    from hvd_easgd.optim import NonFiniteError

    chance = (0.9,) * len(history[0][2])
    clock, step, epoch = 0.0, 0, 0
    while step < plan.steps:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            started = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            try:
                opt.step()
            except NonFiniteError:
                history.append((clock, step + 1, chance))
                return True
            clock += time.perf_counter() - started
            step += 1
            if step % plan.eval_every == 0 or step == plan.steps:
                # job-wide: the slowest worker's clock; a non-finite loss anywhere stops all
                flags = hvd.allreduce(torch.tensor(
                    [clock, 0.0 if math.isfinite(loss.item()) else 1.0], dtype=torch.float64),
                    op=hvd.Max, name="digits.clock")
                if flags[1] > 0:
                    history.append((float(flags[0]), step, chance))
                    return True
                history.append((float(flags[0]), step, evaluate()))
            if step >= plan.steps:
                break
        epoch += 1
    return False
