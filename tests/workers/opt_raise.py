"""Worker: rank 1 raises in its training loop; the job must fail (non-zero) in bounded time.

`--what MODE` ("sync" or "async"). Rank 1 raises at step 5 (before its second round, tau=2);
rank 0 keeps training and must not wait forever for it.
"""

from opt_common import Case, build, init, parse_args, write
from tests.reference import local_backward


def main():
    args = parse_args()
    rank, size = init()
    case = Case(mode=args.what or "sync", tau=2, steps=40)
    model, base, opt = build(case, rank)
    for t in range(1, case.steps + 1):
        if rank == 1 and t == 5:
            raise RuntimeError("worker 1 failed on purpose")
        local_backward(model, opt, case, rank, t)
        opt.step()
    opt.synchronize()
    write(args.out, rank, {"rank": rank, "finished": True})


if __name__ == "__main__":
    main()
