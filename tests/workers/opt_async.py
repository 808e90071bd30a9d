"""Worker: async-mode behaviour (issue 4).

`--cases` is a JSON list of items {"kind": ..., "case": Case dict, ...}:
- "match": as in opt_sync.py (params, center, counters after `synchronize()`).
- "overlap": the exchange's wait (`opt.communicator.wait`) holds every round until training has
  started `hold` more steps (at most `delay` s); report per round the steps taken meanwhile.
- "boom": the exchange's wait raises RuntimeError("boom") on round `fail_round`, after the real
  collective, on the ranks `fail_ranks` (default: every rank); report where and what the
  training thread raised, and (on a rank that raised) what later calls raise.
- "settle": lr set to 0 after `settle_after` steps; params and center at the end.
- "resume": as in opt_sync.py (state_dict() must synchronize the round in flight).
- "close": context manager, close() twice, step() after close.
- "wait_cpu": CPU the training thread uses while a round is late, for the mode of the case.
- "commit": Horovod Elastic's commit/restore through hvd.elastic.TorchState (opt_commit.py).
- "outer_match", "outer_resume", "outer_commit": outer optimizers and DiLoCo (outer_sync.py).
- "noclose" (last): an async optimizer left unclosed with a round in flight; the job exits
  normally, atexit must land the round: the model and center after the exit handlers go to
  `noclose{R}.json` in `--out`.
Writes {"results": [...]} to rank{R}.json.
"""

import atexit
import threading
import time
from pathlib import Path

from opt_common import (
    Case, CollectiveMeter, build, center_list, counters, error_text, init, parse_args, run_items, snapshot,
    train_steps, write,
)
from opt_commit import run_commit
from opt_sync import run_match, run_resume
from outer_sync import run_commit as run_outer_commit
from outer_sync import run_match as run_outer_match
from outer_sync import run_resume as run_outer_resume
from tests.hvdrun import write_json_atomic
from tests.reference import flat, local_backward


class StepClock:
    """The training thread's "step t has started", read by the exchange thread: a condition
    variable, so the reader sees every write and can sleep until the count it waits for."""

    def __init__(self) -> None:
        self._started = 0
        self._changed = threading.Condition()

    def start(self, step: int) -> None:
        with self._changed:
            self._started = step
            self._changed.notify_all()

    def now(self) -> int:
        with self._changed:
            return self._started

    def wait_for(self, step: int, timeout: float) -> int:
        """Wait until step ``step`` has started (at most ``timeout`` s); return the current one."""
        with self._changed:
            self._changed.wait_for(lambda: self._started >= step, timeout=timeout)
            return self._started


def run_overlap(item, rank):
    """A deliberately slow exchange: the wait for each round holds it on the wire until the
    training thread has started `hold` more steps (at most `delay` s: in sync mode the wait runs
    on the training thread itself, which then cannot step). Per round, report how many steps
    training started while the round was on the wire, and whether the wait ran on the training
    thread."""
    case = Case.from_dict(item["case"])
    model, base, opt = build(case, rank)
    hold, delay = int(item["hold"]), float(item["delay"])
    original = opt.communicator.wait
    clock, rounds, rounds_lock = StepClock(), [], threading.Lock()
    # the step in which each round's allreduce was handed to Horovod (on the training thread)
    meter = CollectiveMeter(stamp=clock.now)

    def wait(*args, **kwargs):
        with rounds_lock:
            index = len(rounds)
            rounds.append(None)
        started = meter.of("allreduce")[index].stamp
        now = clock.wait_for(started + hold, timeout=delay)
        result = original(*args, **kwargs)
        with rounds_lock:
            rounds[index] = {"handed_off_at": started, "steps_on_wire": now - started,
                             "training_thread": threading.current_thread() is threading.main_thread()}
        return result

    opt.communicator.wait = wait
    with meter:
        for t in range(1, case.steps + 1):
            local_backward(model, opt, case, rank, t)
            clock.start(t)
            opt.step()
    opt.synchronize()
    out = snapshot(case, opt, model)
    with rounds_lock:
        out["rounds"] = list(rounds)
    opt.close()
    return out


def run_boom(item, rank):
    case = Case.from_dict(item["case"])
    fail_round = int(item["fail_round"])
    fails_here = rank in item.get("fail_ranks", [rank])
    model, base, opt = build(case, rank)
    original = opt.communicator.wait
    calls = {"n": 0}

    def wait(*args, **kwargs):
        calls["n"] += 1
        result = original(*args, **kwargs)  # finish the real collective: no peer waits on us
        if calls["n"] == fail_round and fails_here:
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
    if out["raised_at"] is not None:  # (a healthy rank must not start a round alone)
        try:
            local_backward(model, opt, case, rank, case.steps + 1)
            opt.step()
        except Exception as exc:  # noqa: BLE001
            out["later_step"] = error_text(exc)
        try:
            opt.synchronize()
        except Exception as exc:  # noqa: BLE001
            out["later_sync"] = error_text(exc)
    out["counters"] = counters(opt)
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


def run_wait_cpu(item, rank):
    """An item: rank 1 is `late` s late to each of 3 rounds
    (tau = 1); report rank 0's process CPU seconds and wall seconds of the steps and a final
    synchronize()."""
    case = Case.from_dict(item["case"])
    model, base, opt = build(case, rank)
    cpu, wall = time.process_time(), time.perf_counter()
    for t in range(1, case.steps + 1):
        local_backward(model, opt, case, rank, t)
        if rank == 1:
            time.sleep(float(item["late"]))
        opt.step()
    opt.synchronize()
    out = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
    opt.close()
    return out


def run_noclose(item, rank, out_dir):
    """Leave an async optimizer unclosed with its last round in flight (the job's last item).
    An exit handler registered before the optimizer's (so it runs after it) writes what the
    model and the center are once the interpreter's exit handlers ran: `noclose{R}.json`."""
    case = Case.from_dict(item["case"])
    kept = {}

    def report_after_exit_handlers():
        model, opt = kept["model"], kept["opt"]
        write_json_atomic(Path(out_dir) / f"noclose{rank}.json",
                          {"params": flat(model.parameters()), "center": center_list(opt, model)})

    atexit.register(report_after_exit_handlers)
    model, base, opt = build(case, rank)
    kept.update(model=model, opt=opt)
    train_steps(case, model, opt, rank, 0, case.steps)  # the last round is still in flight
    return {}


def main():
    args = parse_args()
    rank, size = init()
    results = run_items(args, rank, {"match": run_match, "overlap": run_overlap,
                                     "boom": run_boom, "close": run_close,
                                     "settle": run_settle, "resume": run_resume,
                                     "wait_cpu": run_wait_cpu, "commit": run_commit,
                                     "outer_match": run_outer_match,
                                     "outer_resume": run_outer_resume,
                                     "outer_commit": run_outer_commit,
                                     "noclose": lambda item, r: run_noclose(item, r, args.out)})
    write(args.out, rank, {"rank": rank, "size": size, "results": results})


if __name__ == "__main__":
    main()
