"""Worker for tests/optim/test_hardening.py: many scenarios in ONE `horovodrun -np 2` job (issue 15).

`--cases` is a JSON list of items {"kind": ..., ...}, run in order (an item that raises is
reported, not raised):
- "match": as in opt_sync.py (BatchNorm buffers and fp16 compression in async mode and for the
  pulling methods; compared with tests/reference.py by the test).
- "coeffs": alpha/beta as resolved with 2 workers (beta given, alpha given, alpha * p > 1).
- "mixed": several parameter groups with different lr, a frozen parameter, bf16 and fp16
  parameters beside fp32 ones, and step(closure). Every step records, per parameter, the values
  the local step started from (y), the gradient, the values after the local optimizer's step
  (x'), after the wrapper's step (x'') and the center before and after, so the test can replay
  EASGD by hand (alpha = beta / p with p = 2).
- "regrow": resume with 2 workers the trainer's 1-worker checkpoints in `dir_a` (to the
  checkpoint's step: no step is taken) and `dir_b` (further: training goes on).
After the items, `--what peer_exit`: rank 1 writes its result and exits (code 0) in the middle
of an async run; rank 0 goes on training and reports the error it gets (it must not hang).
Writes {"results": [...], ...} to rank{R}.json.
"""

import os
import warnings

import torch
import torch.nn as nn

from opt_common import (
    Case, build, error_text, hvd_easgd, init, parse_args, run_items, write,
)
from opt_sync import run_match
from tests.reference import local_backward


def run_coeffs(item, rank):
    out = {}
    for label, kw in (("beta", {"beta": 0.8}), ("alpha", {"alpha": 0.3, "beta": None}),
                      ("too_big", {"alpha": 0.6, "beta": None})):
        model = nn.Linear(3, 2)
        try:
            opt = hvd_easgd.ElasticOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             named_parameters=model.named_parameters(), tau=2, **kw)
            out[label] = {"alpha": opt.alpha, "beta": opt.beta}
            opt.close()
        except Exception as exc:  # noqa: BLE001
            out[label] = {"raised": error_text(exc)}
    return out


class Mixed(nn.Module):
    """fp32 layers, a bf16 scale, an fp16 shift and a frozen fp32 offset."""

    def __init__(self, rank):
        super().__init__()
        torch.manual_seed(100 + rank)  # rank-dependent: the wrapper must broadcast rank 0's
        self.lin = nn.Linear(6, 4)
        self.scale = nn.Parameter((1.0 + 0.1 * torch.randn(4)).to(torch.bfloat16))
        self.shift = nn.Parameter((0.1 * torch.randn(4)).to(torch.float16))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x) * self.scale.float() + self.shift.float() + self.frozen
        return self.head(torch.tanh(h))


def _values(model):
    return {n: [float(v) for v in p.detach().double().reshape(-1)] for n, p in
            model.named_parameters()}


def run_mixed(item, rank):
    tau, steps, lrs = int(item["tau"]), int(item["steps"]), item["lrs"]
    model = Mixed(rank)
    groups = [
        {"params": [model.lin.weight, model.lin.bias, model.frozen], "lr": lrs[0]},
        {"params": [model.scale, model.shift, model.head.weight, model.head.bias], "lr": lrs[1]},
    ]
    base = torch.optim.SGD(groups, lr=99.0)  # every group sets its own lr
    opt = hvd_easgd.ElasticOptimizer(base, named_parameters=model.named_parameters(), tau=tau,
                                     beta=float(item["beta"]))
    original_step = base.step
    record = {}

    def local_step(closure=None):
        loss = original_step(closure)
        record["x1"] = _values(model)  # after the local optimizer, before the elastic pull
        return loss

    base.step = local_step
    calls = {"n": 0}
    trace = []
    for t in range(1, steps + 1):
        g = torch.Generator().manual_seed(1000 * rank + t)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)

        def closure():
            calls["n"] += 1
            opt.zero_grad()
            record["y"] = _values(model)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            record["grad"] = {n: None if p.grad is None else
                              [float(v) for v in p.grad.double().reshape(-1)]
                              for n, p in model.named_parameters()}
            record["loss"] = float(loss)
            return loss

        center_before = {n: [float(v) for v in c.double().reshape(-1)]
                         for n, c in opt.center_state_dict().items()}
        returned = opt.step(closure)
        trace.append({"t": t, "y": record["y"], "grad": record["grad"], "x1": record["x1"],
                      "x2": _values(model), "c0": center_before,
                      "c1": {n: [float(v) for v in c.double().reshape(-1)]
                             for n, c in opt.center_state_dict().items()},
                      "loss": record["loss"],
                      "returned": None if returned is None else float(returned)})
    out = {"trace": trace, "closure_calls": calls["n"], "alpha": opt.alpha, "beta": opt.beta,
           "lrs": [g["lr"] for g in opt.param_groups],
           "dtypes": {n: str(p.dtype) for n, p in model.named_parameters()},
           "center_dtypes": {n: str(c.dtype) for n, c in opt.center_state_dict().items()},
           "frozen_grad": model.frozen.grad is not None, "rounds": opt.round_count}
    opt.close()
    return out


def run_regrow(item, rank):
    from hvd_easgd.train.cli import run

    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for label in ("a", "b"):
            from hvd_easgd.train.config import load_config

            cfg = load_config(item["recipe"], item["overrides"] + item[f"extra_{label}"])
            summary = run(cfg, run_dir=item[f"dir_{label}"], resume=True)
            out[label] = {k: v for k, v in summary.items()
                          if isinstance(v, (int, float, str, type(None)))}
    out["warnings"] = [str(w.message) for w in caught]
    return out


def peer_exit(rank, results, args, size):
    """Rank 1 leaves (exit code 0, so horovodrun does not kill rank 0) at step 5 of an async run
    with round 2 (step 4) in flight; rank 0 must get an error from step() or synchronize()."""
    case = Case(name="peer-exit", mode="async", tau=2, steps=40)
    model, base, opt = build(case, rank)
    out = {"raised_at": None, "error": None, "later": None}
    for t in range(1, case.steps + 1):
        if rank == 1 and t == 5:
            write(args.out, rank, {"rank": rank, "size": size, "results": results,
                                   "peer_exit": {"left_at": t}})
            os._exit(0)
        local_backward(model, opt, case, rank, t)
        try:
            opt.step()
        except Exception as exc:  # noqa: BLE001
            out["raised_at"], out["error"] = t, error_text(exc)
            break
    if out["raised_at"] is None:
        try:
            opt.synchronize()
        except Exception as exc:  # noqa: BLE001
            out["raised_at"], out["error"] = "synchronize", error_text(exc)
    try:  # the optimizer stays failed
        local_backward(model, opt, case, rank, case.steps + 1)
        opt.step()
    except Exception as exc:  # noqa: BLE001
        out["later"] = error_text(exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.close()
    return out


def main():
    args = parse_args()
    rank, size = init()
    results = run_items(args, rank, {"match": run_match, "coeffs": run_coeffs,
                                     "mixed": run_mixed, "regrow": run_regrow})
    result = {"rank": rank, "size": size, "results": results}
    if args.what == "peer_exit":
        write(args.out, rank, result)  # in case the peer exit goes wrong
        result["peer_exit"] = peer_exit(rank, results, args, size)
    write(args.out, rank, result)


if __name__ == "__main__":
    main()
