"""Worker for elastic jobs: a Horovod Elastic training script written the way Horovod's elastic
examples are (``hvd.elastic.TorchState``, ``@hvd.elastic.run``, ``ElasticSampler``, a reset
callback, ``state.commit()``), with the one-line swap to ``hvd_easgd.DistributedOptimizer``.

Run under an elastic horovodrun whose discovery script lists hosts ``localhost`` and
``127.0.0.1``. Faults are injected by the worker on host ``--victim-host``:
- ``--kill-step N``: SIGKILL itself before global step N (once per job, marked in --out);
- ``--nan-step N``: its gradient is NaN at step N (``--nan-persist``: at every step from N);
- ``--grow-step N --hosts-file F``: after step N the lone first worker commits, adds
  ``127.0.0.1:1`` to F and polls ``state.check_host_updates()`` until Horovod interrupts it
  for the new host: the job grows exactly after step N, however fast the machine.
- environment ``VICTIM_TAU``: the worker on ``--victim-host`` wraps its optimizer with this
  tau instead of ``--tau`` (a worker whose settings differ from the others').
Each process that finishes writes ``--out/<host>-<local rank>.json``: the center's accuracy and
hash, alpha and size at the end, what it saw at every (re)start of the training function, and
the optimizer's counters. A process whose training function raises writes
``--out/stopped-<host>-<local rank>.json`` (the exception, the wall-clock time and the step)
before re-raising.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402

import hvd_easgd  # noqa: E402
from tests.hvdrun import write_json_atomic  # noqa: E402

POLL_SECONDS, WAIT_SECONDS = 0.25, 120


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="sync")
    ap.add_argument("--tau", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--commit-every", type=int, default=5)
    ap.add_argument("--victim-host", default="127.0.0.1")
    ap.add_argument("--kill-step", type=int, default=0)
    ap.add_argument("--nan-step", type=int, default=0)
    ap.add_argument("--nan-persist", action="store_true")
    ap.add_argument("--grow-step", type=int, default=0)
    ap.add_argument("--hosts-file", default=os.environ.get("HOSTS_FILE", ""))
    return ap.parse_args()


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    test, train = order[:360], order[360:]
    return torch.utils.data.TensorDataset(x[train], y[train]), (x[test], y[test])


def accuracy(model, test) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(test[0]).argmax(1)
    model.train()
    return float((pred == test[1]).float().mean())


def grow(state, hosts_file: str) -> None:
    """Commit, list the second host, and wait for Horovod's interrupt (raised right here)."""
    state.commit()
    Path(hosts_file).write_text("localhost:1\n127.0.0.1:1\n")
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        state.check_host_updates()  # raises HostsUpdatedInterrupt once Horovod sees the host
    raise RuntimeError(f"Horovod did not notice the new host within {WAIT_SECONDS} s")


def main():
    args = parse_args()
    out = Path(args.out)
    host = os.environ.get("HOROVOD_HOSTNAME", "unknown")
    slot = os.environ.get("HOROVOD_LOCAL_RANK", "0")
    tau = int(os.environ.get("VICTIM_TAU", args.tau)) if host == args.victim_host else args.tau
    hvd.init()
    torch.manual_seed(1)
    train_set, test = digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    sampler = hvd.elastic.ElasticSampler(train_set, seed=3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    optimizer = hvd_easgd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(), tau=tau, mode=args.mode)
    report = {"host": host, "entries": [], "resets": []}

    def on_reset():
        report["resets"].append({"size": hvd.size(), "alpha": optimizer.alpha})

    state = hvd.elastic.TorchState(model, optimizer, train_sampler=sampler, epoch=0, batch=0)
    state.register_reset_callbacks([on_reset])

    @hvd.elastic.run
    def train(state):
        report["entries"].append({
            "size": hvd.size(), "rank": hvd.rank(), "step": optimizer.step_count,
            "epoch": state.epoch, "distance_to_center": optimizer.local_distance(),
            "fresh_optimizer_state": len(optimizer.optimizer.state) == 0,
        })
        for state.epoch in range(state.epoch, args.epochs):
            for state.batch, (x, y) in enumerate(loader, start=state.batch):
                step = optimizer.step_count + 1
                if host == args.victim_host and args.kill_step == step:
                    marker = out / "killed"
                    if not marker.exists():
                        marker.write_text(str(step))
                        os.kill(os.getpid(), signal.SIGKILL)
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                nan_now = args.nan_step and (step == args.nan_step or
                                             (args.nan_persist and step > args.nan_step))
                if host == args.victim_host and nan_now:
                    marker = out / "nan_started"
                    if not marker.exists():
                        write_json_atomic(marker, time.time())
                    model[0].weight.grad.fill_(float("nan"))
                optimizer.step()
                state.train_sampler.record_batch(state.batch, args.batch_size)
                if state.batch % args.commit_every == 0:
                    state.commit()
                if args.grow_step and step == args.grow_step and hvd.size() == 1:
                    grow(state, args.hosts_file)
            state.batch = 0
            state.train_sampler.set_epoch(state.epoch + 1)
            state.commit()

    try:
        train(state)
    except Exception as exc:
        write_json_atomic(out / f"stopped-{host}-{slot}.json", {
            "type": type(exc).__name__, "message": str(exc), "time": time.time(),
            "step": optimizer.step_count, "entries": report["entries"]})
        raise
    optimizer.synchronize()
    center = optimizer.center_state_dict()
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in center.values())).hexdigest()
    evaluated = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 10))
    evaluated.load_state_dict(center)
    report.update(
        center_accuracy=accuracy(evaluated, test), local_accuracy=accuracy(model, test),
        center_hash=digest, size=hvd.size(), rank=hvd.rank(), alpha=optimizer.alpha,
        beta=optimizer.beta, step=optimizer.step_count, stats=optimizer.stats.as_dict(),
        center_finite=all(bool(torch.isfinite(t).all()) for t in center.values()),
    )
    write_json_atomic(out / f"{host}-{slot}.json", report)


if __name__ == "__main__":
    main()
