"""Worker item "commit" (run by opt_async.py): Horovod Elastic's commit and restore, through
``hvd.elastic.TorchState`` (the state handler the library registers for its optimizer), on
every worker of a real job.

Two runs from the same start: "detour" commits at `commit_at`, trains to `detour_to` (rounds go
over the wire with the peers; in async mode one is in flight at the restore), restores, and
trains to case.steps; "direct" commits at `commit_at`, restores at once, and trains to
case.steps. A restore that brings everything back (parameters, BatchNorm buffers, momentum,
center, counters, the round in flight dropped alike) makes both runs bit-identical on every
worker. The detour also reports what it had at the commit and right after the restore.
"""

import horovod.torch as hvd

from opt_common import Case, build, snapshot, train_steps


def momentum(base) -> list:
    return [base.state[p]["momentum_buffer"].reshape(-1).tolist()
            for group in base.param_groups for p in group["params"]]


def at_this_point(case, opt, model, base, state) -> dict:
    return {**snapshot(case, opt, model), "momentum": momentum(base), "epoch": state.epoch}


def one_run(case, rank, commit_at: int, detour_to: int) -> dict:
    model, base, opt = build(case, rank)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0)
    train_steps(case, model, opt, rank, 0, commit_at)
    state.epoch = 3
    state.commit()
    committed = at_this_point(case, opt, model, base, state)
    train_steps(case, model, opt, rank, commit_at, detour_to)
    moved = snapshot(case, opt, model)["params"] != committed["params"]
    state.epoch = 7
    state.restore()
    restored = at_this_point(case, opt, model, base, state)
    train_steps(case, model, opt, rank, commit_at, case.steps)
    opt.synchronize()
    final = snapshot(case, opt, model)
    opt.close()
    return {"committed": committed, "restored": restored, "moved": moved, "final": final}


def run_commit(item, rank):
    case = Case.from_dict(item["case"])
    commit_at, detour_to = int(item["commit_at"]), int(item["detour_to"])
    return {"detour": one_run(case, rank, commit_at, detour_to),
            "direct": one_run(case, rank, commit_at, commit_at)}
