"""benchmarks/chaos.py for real: a worker SIGKILLed and brought back in one elastic job (issue 25).

The harness runs a stand-in for Horovod's elastic MNIST example, written here (not Horovod's
code): the same structure (``hvd.elastic.run``, ``TorchState`` with epoch and batch, a commit
every batch, a ``DistributedSampler`` built once, ``Train Epoch: E [x/N (p%)]\\tLoss: L`` lines
from every rank, ``Accuracy: X%`` at the end) on a tiny linear model and random data, a short
sleep per batch so that an epoch lasts about half a second. Each of its lines also says
``workers W pid P``, which the harness does not read: the test checks from those, and from
/proc, that the kill and the rejoin really happened.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

STAND_IN = '''
import argparse, os, time
import torch
import torch.nn.functional as F
import horovod.torch as hvd
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=12)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--log-interval", type=int, default=1)
ap.add_argument("--data-dir")
ap.add_argument("--step-seconds", type=float, default=0.05)
args = ap.parse_args()
hvd.init()
torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(320, 8, generator=torch.Generator().manual_seed(1))
data = TensorDataset(x, (x[:, 0] > 0).long())
sampler = DistributedSampler(data, num_replicas=hvd.size(), rank=hvd.rank())
loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
model = torch.nn.Linear(8, 2)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters())

@hvd.elastic.run
def train(state):
    for state.epoch in range(state.epoch, args.epochs + 1):
        sampler.set_epoch(state.epoch)
        remaining = len(loader) - state.batch
        for state.batch, (xb, yb) in enumerate(loader):
            if state.batch >= remaining:
                break
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            time.sleep(args.step_seconds)
            if state.batch % args.log_interval == 0:
                print(f"Train Epoch: {state.epoch} [{state.batch * len(xb)}/{len(sampler)} "
                      f"({100.0 * state.batch / len(loader):.0f}%)]\\tLoss: {loss.item():.6f}"
                      f"\\tworkers {hvd.size()} pid {os.getpid()}")
            state.commit()
        state.batch = 0

state = hvd.elastic.TorchState(model, optimizer, epoch=1, batch=0)
train(state)
correct = (model(x).argmax(1) == data.tensors[1]).float().mean()
accuracy = hvd.allreduce(correct, name="accuracy").item()
if hvd.rank() == 0:
    print(f"Test set: Average loss: 0, Accuracy: {100 * accuracy:.2f}%")
'''

SCHEDULE = "kill@epoch2,join@epoch3"
LINE = re.compile(r"^([0-9.]+)\t\[(\d+)\]<stdout>:Train Epoch: .*workers (\d+) pid (\d+)")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.timeout(300)
def test_kill_and_rejoin_on_schedule(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--example", str(script),
         "--variants", "example/sync-sgd", "--schedule", SCHEDULE, "--no-clean",
         "--example-args", "--epochs 12", "--event-timeout", "120", "--timeout", "240",
         "--work", str(tmp_path / "work"), "--json", str(tmp_path / "chaos.json")],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=280)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-4000:]
    run = json.loads((tmp_path / "chaos.json").read_text())["results"]["example/sync-sgd"]["faults"]
    assert run["exit"] == 0 and run["problem"] is None, report[-4000:]
    assert run["final_accuracy"] is not None and run["samples_per_s"] > 0
    assert "| 1/1 | 1/1 | 0 |" in proc.stdout, proc.stdout  # kills survived, rejoins, exit
    kill, join = run["faults"]
    assert kill["epoch"] >= 2 and kill["recover_s"] >= 0 and join["recover_s"] > 0

    # From the job's own lines (the harness never reads "workers W pid P"): (time, workers, pid)
    lines = [(float(m.group(1)), int(m.group(3)), int(m.group(4)))
             for m in map(LINE.match, open(run["log"])) if m]
    before_kill = {pid for t, _, pid in lines if t < kill["fired"]}
    # the kill happened: the victim's processes trained before it, are dead now and printed
    # nothing after it (0.5 s: lines already in the pipe)
    assert kill["pids"] and kill["pids_gone"] and set(kill["pids"]) <= before_kill
    assert not any(alive(pid) for pid in kill["pids"])
    assert not any(pid in kill["pids"] for t, _, pid in lines if t > kill["fired"] + 0.5)
    # the survivor trained alone (1 worker) before the join
    assert any(w == 1 for t, w, _ in lines if kill["fired"] < t < join["fired"])
    # the rejoin happened: a process never seen before trained with 2 workers after it
    newcomers = {pid for t, w, pid in lines if t >= join["done"] and w == 2} - before_kill
    assert newcomers, "no new worker printed a line with 2 workers after the join"
