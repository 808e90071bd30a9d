"""A Horovod-style training script (like Horovod's examples/pytorch), switched to EASGD by the
one-line swap `hvd.DistributedOptimizer(` -> `hvd_easgd.DistributedOptimizer(`.

Trains an MLP on sklearn's digits with a DistributedSampler, broadcast_parameters,
broadcast_optimizer_state, a StepLR scheduler, zero_grad and param_groups; writes the initial
and final average loss (of the center), the center itself and this worker's parameters, and
what each Horovod call did.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
import torch.utils.data.distributed
from sklearn.datasets import load_digits

import horovod.torch as hvd
import hvd_easgd

from tests.hvdrun import write_rank_result

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--momentum", type=float, default=0.9)
args = parser.parse_args()

# Horovod: initialize library.
hvd.init()
torch.manual_seed(42)
torch.set_num_threads(1)

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target, dtype=torch.long)
train_dataset = torch.utils.data.TensorDataset(X, y)

# Horovod: use DistributedSampler to partition the training data.
train_sampler = torch.utils.data.distributed.DistributedSampler(
    train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
train_loader = torch.utils.data.DataLoader(
    train_dataset, batch_size=args.batch_size, sampler=train_sampler)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
base_optimizer = optimizer

# Horovod: broadcast parameters & optimizer state.
hvd.broadcast_parameters(model.state_dict(), root_rank=0)

# Horovod: wrap optimizer with DistributedOptimizer.  (The one-line swap.)
optimizer = hvd_easgd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                           tau=4)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)


def full_loss(params_model):
    """Average loss over the whole data set, averaged over workers."""
    params_model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(params_model(X), y)
    params_model.train()
    return float(hvd.allreduce(loss.detach(), name="eval_loss"))


initial = full_loss(model)
lrs = []
epoch_losses = []
for epoch in range(args.epochs):
    train_sampler.set_epoch(epoch)
    total, count = 0.0, 0
    for data, target in train_loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        total += float(loss)
        count += 1
    scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    epoch_losses.append(total / max(count, 1))

optimizer.synchronize()
center_model = Net()
center_model.load_state_dict(model.state_dict())
missing = center_model.load_state_dict(optimizer.center_state_dict(), strict=False).missing_keys
final = full_loss(center_model)
center_model.eval()
with torch.no_grad():  # this worker's own loss of its center: no collective in it
    local_final = float(F.cross_entropy(center_model(X), y))
center = [float(v) for t in optimizer.center_state_dict().values() for v in t.reshape(-1)]
params = [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]
sd = optimizer.state_dict()
zero_grad_ok = all(p.grad is None or float(p.grad.abs().sum()) == 0.0
                   for p in (optimizer.zero_grad() or model.parameters()))

write_rank_result(args.out, hvd.rank(), {
    "initial_loss": initial,
    "final_loss": final,
    "local_final_loss": local_final,
    "center": center,
    "center_names": list(optimizer.center_state_dict()),
    "params": params,
    "epoch_losses": epoch_losses,
    "lrs": lrs,
    "base_lr": base_optimizer.param_groups[0]["lr"],
    "missing": missing,
    "state_dict_keys": sorted(str(k) for k in sd.keys()),
    "steps": optimizer.step_count,
    "rounds": optimizer.round_count,
    "zero_grad_ok": zero_grad_ok,
})
optimizer.close()
