"""Worker: async-mode behaviour (issue 4).

`--cases` is a JSON list of items {"kind": ..., "case": Case dict, ...}:
- "match": as in opt_sync.py (params, center, counters after `synchronize()`).
- "overlap": every step sleeps `work` seconds; the exchange's wait is made slow (`delay` s) by
  wrapping `opt.communicator.wait`; report `opt.stats` before and after the final synchronize.
- "boom": the exchange's wait raises RuntimeError("boom") on round `fail_round` (on every rank);
  report where and what the training thread raised, and what later calls raise.
- "settle": lr set to 0 after `settle_after` steps; params and center at the end.
- "resume": as in opt_sync.py (state_dict() must synchronize the round in flight).
- "close": context manager, close() twice, step() after close.
`--what noclose`: after the items, leave an async optimizer with a round in flight unclosed and
exit normally (atexit must finish it).
Writes {"results": [...]} to rank{R}.json.
"""

import time

from opt_common import (
    Case, build, error_text, init, parse_args, run_items, snapshot, stats_dict, train_steps,
    write,
)
from opt_sync import run_match, run_resume
from tests.reference import flat, local_backward


def slow_wait(opt, delay):
    original = opt.communicator.wait

    def wait(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)

    opt.communicator.wait = wait


def run_overlap(item, rank):
    case = Case.from_dict(item["case"])
    model, base, opt = build(case, rank)
    slow_wait(opt, float(item["delay"]))
    work = float(item["work"])
    for t in range(1, case.steps + 1):
        local_backward(model, opt, case, rank, t)
        time.sleep(work)
        opt.step()
    before = stats_dict(opt)
    opt.synchronize()
    after = stats_dict(opt)
    opt.close()
    return {"before_sync": before, "after_sync": after}


def run_boom(item, rank):
    case = Case.from_dict(item["case"])
    fail_round = int(item["fail_round"])
    model, base, opt = build(case, rank)
    original = opt.communicator.wait
    calls = {"n": 0}

    def wait(*args, **kwargs):
        calls["n"] += 1
        result = original(*args, **kwargs)  # finish the real collective: no peer waits on us
        if calls["n"] == fail_round:
            raise RuntimeError("boom")
        return result

    opt.communicator.wait = wait
    out = {"raised_at": None, "first": None, "later_step": None, "later_sync": None}
    for t in range(1, case.steps + 1):
        local_backward(model, opt, case, rank, t)
        try:
            opt.step()
        except Exception as exc:  # noqa: BLE001
            out["raised_at"] = t
            out["first"] = error_text(exc)
            break
    if out["raised_at"] is None:
        try:
            opt.synchronize()
        except Exception as exc:  # noqa: BLE001
            out["raised_at"] = "synchronize"
            out["first"] = error_text(exc)
    try:
        local_backward(model, opt, case, rank, case.steps + 1)
        opt.step()
    except Exception as exc:  # noqa: BLE001
        out["later_step"] = error_text(exc)
    try:
        opt.synchronize()
    except Exception as exc:  # noqa: BLE001
        out["later_sync"] = error_text(exc)
    try:
        opt.close()
        out["close_ok"] = True
    except Exception as exc:  # noqa: BLE001
        out["close_ok"] = False
        out["close_error"] = error_text(exc)
    out["wait_calls"] = calls["n"]
    return out


def run_settle(item, rank):
    """Train with the case's lr until `settle_after`, then with lr=0 to case.steps: a pulling
    method must then leave every worker on the center."""
    case = Case.from_dict(item["case"])
    model, base, opt = build(case, rank)
    trace = []
    for t in range(1, case.steps + 1):
        if t == int(item["settle_after"]) + 1:
            for group in opt.param_groups:
                group["lr"] = 0.0
        local_backward(model, opt, case, rank, t)
        opt.step()
        if t % case.tau == 0:
            trace.append(flat(model.parameters())[:4])
    opt.synchronize()
    out = snapshot(case, opt, model)
    out["trace"] = trace
    opt.close()
    return out


def run_close(item, rank):
    case = Case.from_dict(item["case"])
    out = {}
    model, base, opt = build(case, rank)
    with opt as entered:
        out["enter_returns_self"] = entered is opt
        train_steps(case, model, opt, rank, 0, case.steps)
    out["after_with"] = snapshot(case, opt, model)
    try:
        opt.close()
        opt.close()
        out["close_twice_ok"] = True
    except Exception as exc:  # noqa: BLE001
        out["close_twice_ok"] = False
        out["close_error"] = error_text(exc)
    try:
        local_backward(model, opt, case, rank, case.steps + 1)
        opt.step()
        out["step_after_close"] = None
    except Exception as exc:  # noqa: BLE001
        out["step_after_close"] = error_text(exc)
    return out


def main():
    args = parse_args()
    rank, size = init()
    results = run_items(args, rank, {"match": run_match, "overlap": run_overlap,
                                     "boom": run_boom, "close": run_close,
                                     "settle": run_settle, "resume": run_resume})
    if args.what == "noclose":
        case = Case(mode="async", tau=2, steps=5)
        model, base, opt = build(case, rank)
        train_steps(case, model, opt, rank, 0, case.steps)  # round 2 is in flight, never closed
        results.append({"ok": True, "noclose_rounds": opt.round_count})
        globals()["_keep_alive"] = opt
    write(args.out, rank, {"rank": rank, "size": size, "results": results})


if __name__ == "__main__":
    main()
