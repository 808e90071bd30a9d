"""Worker: hierarchical EASGD and EASGD among a process set (issue 12), 4 processes on two
"hosts" (horovodrun -np 4 -H localhost:2,127.0.0.1:2). Horovod starts with dynamic process
sets; the optimizer registers the ones it needs.

`--cases` is a JSON list of items {"kind": ..., "case": Case dict, ...}:
- "match": train with case.extra (e.g. {"hierarchy": "host"}) for case.steps steps; report
  params, center, counters, the parameter bytes, and every collective handed to Horovod while
  training ([family, process set ranks, bytes], tests/workers/opt_common.py's CollectiveMeter).
- "error": construct with case.extra; report the exception (every rank must raise alike).
- "process_set": EASGD among `ranks` via hvd_easgd.DistributedOptimizer(process_set=...); the
  other ranks try the same and must get a clear error. Run it last: the ranks outside the set
  construct no optimizer, so later optimizers' names would no longer agree.
Writes {"results": [...]} to rank{R}.json.
"""

import warnings

from opt_common import (
    Case, CollectiveMeter, hvd, local_backward, run_items, snapshot, train_steps, parse_args, write, wrapper_kwargs,
)

import hvd_easgd
from tests.reference import build_model, build_optimizer


def build(case: Case, rank: int, **extra):
    model = build_model(case, rank)
    base = build_optimizer(case, model.parameters())
    kw = wrapper_kwargs(case, model)
    kw.update(extra)
    return model, hvd_easgd.ElasticOptimizer(base, **kw)


def run_match(item, rank):
    case = Case.from_dict(item["case"])
    model, opt = build(case, rank)
    with CollectiveMeter() as meter:  # what this worker hands to Horovod while it trains
        train_steps(case, model, opt, rank, 0, case.steps)
        opt.synchronize()
    out = snapshot(case, opt, model)
    out["collectives"] = [[c.family, list(c.ranks), c.nbytes] for c in meter.calls]
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["alpha"] = opt.alpha
    opt.close()
    return out


def run_error(item, rank):
    case = Case.from_dict(item["case"])
    try:
        build(case, rank)
    except (ValueError, TypeError) as error:
        return {"error_type": type(error).__name__, "message": str(error)}
    return {"error_type": None, "message": ""}


def run_process_set(item, rank):
    case = Case.from_dict(item["case"])
    ranks = item["ranks"]
    process_set = next(ps for ps in SETS if ps.ranks == ranks)
    model = build_model(case, rank)
    base = build_optimizer(case, model.parameters())
    kw = wrapper_kwargs(case, model)
    kw.pop("named_parameters")
    try:
        opt = hvd_easgd.DistributedOptimizer(base, model.named_parameters(),
                                             process_set=process_set, **kw)
    except ValueError as error:
        return {"member": False, "message": str(error)}
    nan = item.get("nan")  # {"rank": R, "step": S}: rank R's gradient is NaN at step S
    if nan is None:
        train_steps(case, model, opt, rank, 0, case.steps)
    else:
        train_steps(case, model, opt, rank, 0, nan["step"] - 1)
        local_backward(model, opt, case, rank, nan["step"])
        if rank == nan["rank"]:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        with warnings.catch_warnings(record=True) as caught:  # the round that sees it: step+2
            warnings.simplefilter("always")
            opt.step()
            train_steps(case, model, opt, rank, nan["step"], case.steps)
    out = snapshot(case, opt, model)
    out["skipped_rounds"] = opt.stats.skipped_rounds
    out["warnings"] = [str(w.message) for w in caught] if nan is not None else []
    opt.close()
    return {"member": True, **out}


SETS = []


def main():
    args = parse_args()
    hvd.init(process_sets="dynamic")
    rank, size = hvd.rank(), hvd.size()
    SETS.append(hvd.add_process_set([0, 1, 2]))  # collective: every rank registers it
    results = run_items(args, rank, {"match": run_match, "error": run_error,
                                     "process_set": run_process_set})
    write(args.out, rank, {"rank": rank, "size": size, "results": results})
    # A rank outside the process set is done early: it must not shut Horovod down under the
    # members' feet, so everyone meets here.
    hvd.allreduce(hvd_easgd_barrier(), name="hier_run.done")


def hvd_easgd_barrier():
    import torch

    return torch.zeros(1)


if __name__ == "__main__":
    main()
