"""Worker for the 2 -> 1 -> 2 test: tests/reference.py's problem under Horovod Elastic.

Run under an elastic horovodrun whose discovery script reads ``--hosts-file`` (first
``localhost:1`` and ``127.0.0.1:1``; Horovod picks either as rank 0). After step
``--shrink-after`` rank 0 leaves only its own host in the hosts file, after ``--grow-after`` it
lists both again. At both points
every worker commits and then polls ``state.check_host_updates()`` until Horovod raises its
``HostsUpdatedInterrupt``, so the membership changes exactly after those steps whatever the
machine's speed. The optimizer is ``hvd_easgd.ElasticOptimizer`` with its defaults for
elastic jobs; every step reads ``make_batch(case, rank, step)``.

Each process that finishes writes ``--out/<host>-<pid>.json``: its final parameters and
center (flat lists), the ``(step, size, rank)`` it trained each step with, and Horovod's rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402

import hvd_easgd  # noqa: E402
from tests.hvdrun import write_json_atomic  # noqa: E402
from tests.reference import Case, build_model, build_optimizer, flat, local_backward  # noqa: E402

BOTH = "localhost:1\n127.0.0.1:1\n"
POLL_SECONDS, WAIT_SECONDS = 0.25, 120


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", required=True, help="a tests.reference.Case as JSON")
    ap.add_argument("--shrink-after", type=int, required=True)
    ap.add_argument("--grow-after", type=int, required=True)
    ap.add_argument("--hosts-file", default=os.environ.get("HOSTS_FILE", ""))
    return ap.parse_args()


def change_hosts(state, hosts_file: str, hosts: str) -> None:
    """Rank 0 rewrites the hosts file; everyone waits for Horovod's interrupt."""
    if hvd.rank() == 0:
        Path(hosts_file).write_text(hosts)
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        state.check_host_updates()  # raises HostsUpdatedInterrupt on every worker at once
    raise RuntimeError(f"Horovod did not notice the new hosts within {WAIT_SECONDS} s")


def main():
    args = parse_args()
    case = Case.from_dict(json.loads(args.case))
    hvd.init()
    model = build_model(case, rank=hvd.rank())  # the first sync starts everyone at rank 0's
    opt = hvd_easgd.ElasticOptimizer(
        build_optimizer(case, model.parameters()), model.named_parameters(), tau=case.tau,
        beta=case.beta, **case.extra)
    trace = []
    state = hvd.elastic.TorchState(model=model, optimizer=opt)

    @hvd.elastic.run
    def train(state):
        while opt.step_count < case.steps:
            t = opt.step_count + 1
            local_backward(model, opt, case, hvd.rank(), t)
            opt.step()
            trace.append([t, hvd.size(), hvd.rank()])
            state.commit()
            if t == args.shrink_after and hvd.size() == 2:
                change_hosts(state, args.hosts_file, f"{os.environ['HOROVOD_HOSTNAME']}:1\n")
            if t == args.grow_after and hvd.size() == 1:
                change_hosts(state, args.hosts_file, BOTH)

    train(state)
    host = os.environ.get("HOROVOD_HOSTNAME", "unknown")
    write_json_atomic(Path(args.out) / f"{host}-{os.getpid()}.json", {
        "host": host, "rank": hvd.rank(), "size": hvd.size(), "trace": trace,
        "params": flat(model.parameters()),
        "center": flat(opt.center_state_dict()[n] for n, _ in model.named_parameters()),
        "steps": opt.step_count, "rounds": opt.round_count,
    })


if __name__ == "__main__":
    main()
