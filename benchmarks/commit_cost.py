"""What a Horovod Elastic commit (and a restore) costs next to a training step (issue 10).

    python benchmarks/commit_cost.py --model heavy      # 25.2 M parameters, SGD with momentum

One process (no peer needed: a commit is local). Prints the median time of a plain training
step (forward, backward, optimizer step), of hvd_easgd's part of ``state.commit()`` (parameters,
center, local optimizer state and counters into reused host buffers), of Horovod's own part
(its model handler's deep copy of ``state_dict()``), and of a restore, each also as a fraction
of the plain step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from benchmarks.common import format_table, model_spec


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="heavy", choices=["heavy", "cifar"])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hvd.init()
    import hvd_easgd
    from hvd_easgd.optim.center import restore_commit, take_commit

    spec = model_spec(args.model)
    model = spec.build()
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt = hvd_easgd.ElasticOptimizer(base, model.named_parameters(), tau=16)
    x = torch.randn(spec.default_batch, *spec.input_shape)
    y = torch.randint(0, spec.num_classes, (spec.default_batch,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    saved = [take_commit(opt.buffers, opt.optimizer, opt.counters)]
    pieces = {
        "plain training step": median_seconds(step, args.reps),
        "hvd_easgd commit (reused buffers)": median_seconds(
            lambda: saved.__setitem__(0, take_commit(opt.buffers, opt.optimizer, opt.counters,
                                                     reuse=saved[0])), args.reps),
        "Horovod's model copy (deepcopy state_dict)": median_seconds(
            lambda: copy.deepcopy(model.state_dict()), args.reps),
        "hvd_easgd restore": median_seconds(
            lambda: restore_commit(opt.buffers, opt.optimizer, saved[0]), args.reps),
    }
    plain = pieces["plain training step"]
    params = sum(p.numel() for p in model.parameters())
    print(f"## commit cost: model {args.model} ({params:,} parameters), 1 thread\n")
    print(format_table(["piece", "ms", "x plain step"],
                       [[k, 1000 * v, v / plain] for k, v in pieces.items()]))
    opt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
