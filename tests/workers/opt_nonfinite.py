"""Worker: one rank's gradient turns NaN (issue 10).

`--cases` is a JSON list of {"case": Case dict, "nan_step": S, "persist": bool, "value": V}. Rank 1
fills its gradient with NaN (or V) at step S (and, with persist, at every later step).

Everything is observed from outside the optimizer: the center before and after every step, and
every collective handed to Horovod (tests/workers/opt_common.py's CollectiveMeter). A skipped
round is a step at which a round should have moved the center (tests.reference.landing_steps)
and did not; rank 1 also records whether it then sits on the center with an empty local
optimizer state. A persistent NaN must raise NonFiniteError on every rank: the step and message
are kept.
"""

import hashlib

import torch

from opt_common import Case, CollectiveMeter, build, error_text, init, parse_args, run_items, write
from tests.reference import flat, landing_steps, local_backward


def center_of(opt):
    return [t.clone() for t in opt.center_state_dict().values()]


def poison(model, value: float) -> None:
    for p in model.parameters():
        p.grad.fill_(value)


def train(case, item, rank, model, base, opt, out) -> None:
    """The case's steps, recording where the center should have moved and did not."""
    nan_step, persist = int(item["nan_step"]), bool(item.get("persist"))
    value = float(item.get("value", "nan"))  # a huge finite value overflows fp16 on the wire
    landings = set(landing_steps(case))
    for t in range(1, case.steps + 1):
        local_backward(model, opt, case, rank, t)
        if rank == 1 and (t == nan_step or (persist and t > nan_step)):
            poison(model, value)
        before = center_of(opt)
        try:
            opt.step()
        except Exception as exc:  # noqa: BLE001
            out["raised"] = {"step": t, **error_text(exc)}
            return
        after = center_of(opt)
        moved = not all(torch.equal(a, b) for a, b in zip(before, after))
        if moved and t not in landings:
            out["moved_off_schedule"].append(t)
        if t in landings and not moved:
            out["skips"].append(t)
            if rank == 1:
                on_center = all(torch.equal(p, c) for p, c in zip(model.parameters(), after))
                out["restart_on_center"].append(on_center and len(base.state) == 0)
    opt.synchronize()


def run_case(item, rank):
    case = Case.from_dict(item["case"])
    model, base, opt = build(case, rank)
    out = {"skips": [], "raised": None, "restart_on_center": [], "moved_off_schedule": []}
    with CollectiveMeter() as meter:
        train(case, item, rank, model, base, opt, out)
    center = center_of(opt)
    out["center_hash"] = hashlib.sha256(b"".join(c.numpy().tobytes() for c in center)).hexdigest()
    out["finite"] = all(bool(torch.isfinite(c).all()) for c in center) and all(
        map(lambda v: v == v and abs(v) != float("inf"), flat(model.parameters())))
    out["allreduces"] = meter.calls_of("allreduce")
    opt.close()
    return out


def main():
    args = parse_args()
    rank, _ = init()
    write(args.out, rank, {"results": run_items(args, rank, {"nan": run_case})})


if __name__ == "__main__":
    main()
