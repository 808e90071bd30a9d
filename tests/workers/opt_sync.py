"""Worker: synchronous/async training cases compared against tests/reference.py.

`--cases` is a JSON list of items {"kind": ..., "case": Case dict, ...}:
- "match": train case.steps steps, counting allreduces after every step (wrapped Horovod
  functions), then `synchronize()`; report params, center, counters, stats, the per-step
  allreduce counts, the bytes handed to Horovod's allreduces, and a center_state_dict() load
  check. With case.buffers, also the floating
  buffers right before (after forward) and right after every round step.
- "resume": uninterrupted run (in async mode, synchronized at `save_at`, as state_dict() does)
  vs. a run saved at step `save_at` (state_dict of the wrapper and the
  model), rebuilt fresh (other init), loaded and continued; both snapshots reported.
- "mismatch": rank 1 builds another model or wraps with other settings (opt_mismatch.py).
- "early": sync EASGD's round started when the step before it ends (Rounds.start_early): a
  run where rank 0 edits a parameter in place between those steps (warnings per rank); a run
  closed with such a round on the wire (center and counters before/after); a run that loads
  its own state dict while one is on the wire, against the same run without the load.
Writes {"results": [...]} to rank{R}.json.
"""

from opt_common import (
    AllreduceCounter, Case, build, center_list, counters, float_buffers_list,
    init, parse_args, run_items, snapshot, train_steps, write,
)
import copy

from tests.reference import flat, float_buffers

import torch


def run_match(item, rank):
    case = Case.from_dict(item["case"])
    model, base, opt = build(case, rank)
    per_step = []
    bufs_sent, bufs_before, bufs_after = {}, {}, {}
    from tests.reference import local_backward

    with AllreduceCounter() as counter:
        for t in range(1, case.steps + 1):
            if case.buffers and t % case.tau == 0:
                bufs_sent[t] = float_buffers_list(model)  # before the round step's forward
            local_backward(model, opt, case, rank, t)
            if case.buffers and t % case.tau == 0:
                bufs_before[t] = float_buffers_list(model)
            before = counter.count
            opt.step()
            per_step.append(counter.count - before)
            if case.buffers and t % case.tau == 0:
                bufs_after[t] = float_buffers_list(model)
        before = counter.count
        opt.synchronize()
        sync_count = counter.count - before
        total_count = counter.count
    out = snapshot(case, opt, model)
    out.update(per_step=per_step, sync_allreduces=sync_count, total_allreduces=total_count,
               allreduce_bytes=sum(c.nbytes for c in counter.of("allreduce")),
               bufs_sent=bufs_sent, bufs_before=bufs_before, bufs_after=bufs_after)
    # center_state_dict loads into a fresh model
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    sd = opt.center_state_dict()
    res = fresh.load_state_dict(sd, strict=False)
    out["csd_missing"] = list(res.missing_keys)
    out["csd_unexpected"] = list(res.unexpected_keys)
    out["csd_keys"] = sorted(sd.keys())
    out["center_buffers"] = flat(sd[n] for n, _ in float_buffers(model) if n in sd)
    out["csd_dtypes"] = sorted({str(v.dtype) for v in sd.values()})
    out["csd_loaded_params"] = flat(fresh.parameters())
    if hasattr(opt, "close"):
        opt.close()
    return out


def run_resume(item, rank):
    case = Case.from_dict(item["case"])
    save_at = int(item["save_at"])
    # uninterrupted
    model, base, opt = build(case, rank)
    train_steps(case, model, opt, rank, 0, save_at)
    if case.mode == "async":
        opt.synchronize()  # what state_dict() does at the save point
    train_steps(case, model, opt, rank, save_at, case.steps)
    opt.synchronize()
    full = snapshot(case, opt, model)
    opt.close() if hasattr(opt, "close") else None
    # interrupted at save_at
    model, base, opt = build(case, rank)
    train_steps(case, model, opt, rank, 0, save_at)
    sd = opt.state_dict()
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd = copy.deepcopy(sd)
    saved_counters = counters(opt)
    opt.close() if hasattr(opt, "close") else None
    del opt, base, model
    other = Case.from_dict({**item["case"], "seed": case.seed + 12345})  # a different init
    model2, base2, opt2 = build(other, rank)
    model2.load_state_dict(model_sd)
    opt2.load_state_dict(sd)
    loaded_counters = counters(opt2)
    train_steps(case, model2, opt2, rank, save_at, case.steps)
    opt2.synchronize()
    resumed = snapshot(case, opt2, model2)
    opt2.close() if hasattr(opt2, "close") else None
    return {"full": full, "resumed": resumed, "saved_counters": saved_counters,
            "loaded_counters": loaded_counters}


def run_early(item, rank):
    import warnings

    case = Case.from_dict(item["case"])
    before_round = case.tau - 1
    out = {}
    # an in-place edit on rank 0 between the round's launch and its step
    model, base, opt = build(case, rank)
    train_steps(case, model, opt, rank, 0, before_round)
    out["in_flight"] = opt.rounds.early is not None
    if rank == 0:
        with torch.no_grad():
            next(model.parameters()).mul_(1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(case, model, opt, rank, before_round, case.steps)
    out["warned"] = sorted({type(w.message).__name__ for w in caught})
    opt.close()
    # closed with a round on the wire: waited for, not applied
    model, base, opt = build(case, rank)
    train_steps(case, model, opt, rank, 0, before_round)
    center = center_list(opt, model)
    opt.close()
    out["close"] = {"center_kept": center_list(opt, model) == center,
                    "counters": counters(opt), "dropped": opt.stats.dropped_rounds}
    # load_state_dict with a round on the wire drops it; the round step starts it again
    runs = {}
    for load in (False, True):
        model, base, opt = build(case, rank)
        train_steps(case, model, opt, rank, 0, before_round)
        if load:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            out["load_dropped"] = opt.stats.dropped_rounds
        train_steps(case, model, opt, rank, before_round, case.steps)
        runs[load] = snapshot(case, opt, model)
        opt.close()
    out["load_same"] = (runs[True]["params"] == runs[False]["params"]
                        and runs[True]["center"] == runs[False]["center"]
                        and runs[True]["counters"] == runs[False]["counters"])
    return out


def main():
    args = parse_args()
    rank, size = init()
    from opt_mismatch import run_mismatch

    results = run_items(args, rank, {"match": run_match, "resume": run_resume,
                                     "mismatch": run_mismatch, "early": run_early})
    write(args.out, rank, {"rank": rank, "size": size, "results": results})


if __name__ == "__main__":
    main()
