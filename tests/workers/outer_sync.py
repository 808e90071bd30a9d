"""Worker: outer optimizers and DiLoCo (issue 12) against tests/reference.py's OuterReference.

`--cases` is a JSON list of items {"kind": ..., "case": Case dict, ...}; Case.extra may name an
outer optimizer of tests.reference.OUTER_FACTORIES as "outer_optimizer".
- "match": train case.steps steps, synchronize(); report params, center, counters.
- "resume": uninterrupted run vs. a run saved by state_dict() at `save_at`, rebuilt from another
  initialisation, loaded and continued (the outer optimizer's momentum must travel).
- "commit": take an elastic commit at `save_at`, train to `steps`, restore the commit (as
  hvd.elastic does after a lost worker) and go through horovod_elastic.sync_workers, train to `steps`
  again: both continuations must be bit-identical.
Writes {"results": [...]} to rank{R}.json.
"""

import copy

from opt_common import (
    Case, counters, init, parse_args, run_items, snapshot, train_steps, write,
)

import hvd_easgd
from hvd_easgd.optim import horovod_elastic
from hvd_easgd.optim.center import restore_commit, take_commit
from tests.reference import build_model, build_optimizer
from opt_common import wrapper_kwargs


def build(case: Case, rank: int):
    model = build_model(case, rank)
    base = build_optimizer(case, model.parameters())
    return model, hvd_easgd.ElasticOptimizer(base, **wrapper_kwargs(case, model))


def run_match(item, rank):
    case = Case.from_dict(item["case"])
    model, opt = build(case, rank)
    train_steps(case, model, opt, rank, 0, case.steps)
    opt.synchronize()
    out = snapshot(case, opt, model)
    out["outer_state_keys"] = sorted(map(str, opt.state_dict()["easgd"]["outer"]["state"]))
    opt.close()
    return out


def run_resume(item, rank):
    case = Case.from_dict(item["case"])
    save_at = int(item["save_at"])
    model, opt = build(case, rank)
    train_steps(case, model, opt, rank, 0, save_at)
    opt.synchronize()  # what state_dict() does at the save point
    train_steps(case, model, opt, rank, save_at, case.steps)
    opt.synchronize()
    full = snapshot(case, opt, model)
    opt.close()
    model, opt = build(case, rank)
    train_steps(case, model, opt, rank, 0, save_at)
    sd = copy.deepcopy(opt.state_dict())
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt.close()
    other = Case.from_dict({**item["case"], "seed": case.seed + 12345})  # another init
    model2, opt2 = build(other, rank)
    model2.load_state_dict(model_sd)
    opt2.load_state_dict(sd)
    train_steps(case, model2, opt2, rank, save_at, case.steps)
    opt2.synchronize()
    resumed = snapshot(case, opt2, model2)
    opt2.close()
    return {"full": full, "resumed": resumed}


def run_commit(item, rank):
    """Through ``hvd.elastic.TorchState``, i.e. the state handler the library registers for its
    optimizer: commit at `save_at`, train on, restore and sync (what a reset does), train on
    again: both continuations must be bit-identical."""
    import horovod.torch as hvd

    case = Case.from_dict(item["case"])
    save_at = int(item["save_at"])
    model, opt = build(case, rank)
    state = hvd.elastic.TorchState(model=model, optimizer=opt)
    train_steps(case, model, opt, rank, 0, save_at)
    state.commit()
    train_steps(case, model, opt, rank, save_at, case.steps)
    opt.synchronize()
    first = snapshot(case, opt, model)
    state.restore()
    state.sync()
    after_restore = counters(opt)
    train_steps(case, model, opt, rank, save_at, case.steps)
    opt.synchronize()
    second = snapshot(case, opt, model)
    opt.close()
    return {"first": first, "second": second, "after_restore": after_restore}


def main():
    args = parse_args()
    rank, size = init()
    results = run_items(args, rank, {"match": run_match, "resume": run_resume,
                                     "commit": run_commit})
    write(args.out, rank, {"rank": rank, "size": size, "results": results})


if __name__ == "__main__":
    main()
