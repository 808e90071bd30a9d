"""Worker: one rank's gradient turns NaN (issue 10).

`--cases` is a JSON list of {"case": Case dict, "nan_step": S, "persist": bool, "value": V}. Rank 1
fills its gradient with NaN (or V) at step S (and, with persist, at every later step). Every rank records, at
every step, the skipped-round counter and the center before and after the step; rank 1 also
records whether it sits on the center with an empty optimizer state right after a skipped
round. A persistent NaN must raise NonFiniteError on every rank: the step and message are kept.
"""

import hashlib

import torch

from opt_common import Case, build, error_text, init, parse_args, run_items, write
from tests.reference import flat, local_backward


def center_of(opt):
    return [t.clone() for t in opt.center_state_dict().values()]


def run_case(item, rank):
    case = Case.from_dict(item["case"])
    nan_step, persist = int(item["nan_step"]), bool(item.get("persist"))
    value = float(item.get("value", "nan"))  # a huge finite value overflows fp16 on the wire
    model, base, opt = build(case, rank)
    out = {"skips": [], "raised": None, "restart_on_center": [], "unchanged_center": []}
    for t in range(1, case.steps + 1):
        local_backward(model, opt, case, rank, t)
        if rank == 1 and (t == nan_step or (persist and t > nan_step)):
            for p in model.parameters():
                p.grad.fill_(value)
        before, skipped = center_of(opt), opt.stats.skipped_rounds
        try:
            opt.step()
        except Exception as exc:  # noqa: BLE001
            out["raised"] = {"step": t, **error_text(exc)}
            break
        if opt.stats.skipped_rounds > skipped:
            out["skips"].append(t)
            after = center_of(opt)
            out["unchanged_center"].append(all(torch.equal(a, b) for a, b in zip(before, after)))
            if rank == 1:
                on_center = all(torch.equal(p, c) for p, c in zip(model.parameters(), after))
                out["restart_on_center"].append(on_center and len(base.state) == 0)
    if out["raised"] is None:
        opt.synchronize()
    center = center_of(opt)
    out["center_hash"] = hashlib.sha256(b"".join(c.numpy().tobytes() for c in center)).hexdigest()
    out["finite"] = all(bool(torch.isfinite(c).all()) for c in center) and all(
        bool(torch.isfinite(torch.tensor(flat(model.parameters()))).all()) for _ in [0])
    out["allreduce_calls"], out["rounds"] = opt.stats.allreduce_calls, opt.stats.rounds
    out["skipped_rounds"] = opt.stats.skipped_rounds
    opt.close()
    return out


def main():
    args = parse_args()
    rank, _ = init()
    write(args.out, rank, {"results": run_items(args, rank, {"nan": run_case})})


if __name__ == "__main__":
    main()
