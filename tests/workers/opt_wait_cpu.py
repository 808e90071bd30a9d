"""Worker: how much CPU a worker burns while it waits for a late peer's round.

For each mode: tau = 1; rank 1 sleeps `--late` seconds before each of its 3 steps, so rank 0
waits about that long for every round. Rank 0 reports the process CPU seconds (every thread:
training, our waiting thread, Horovod's background thread) and the wall seconds of its steps
(plus, in async mode, of a final synchronize). A waiting loop that spins burns a core for the
whole wait; one that sleeps burns almost nothing.
"""

import time

from opt_common import Case, build, init, parse_args, write
from tests.reference import local_backward


def main():
    args = parse_args()
    rank, _ = init()
    late = 1.0
    out = {}
    for mode in ("sync", "async"):
        case = Case(name=f"wait-{mode}", mode=mode, tau=1, steps=3)
        model, base, opt = build(case, rank)
        cpu, wall = time.process_time(), time.perf_counter()
        for t in range(1, case.steps + 1):
            local_backward(model, opt, case, rank, t)
            if rank == 1:
                time.sleep(late)
            opt.step()
        opt.synchronize()
        out[mode] = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
        opt.close()
    write(args.out, rank, out)


if __name__ == "__main__":
    main()
