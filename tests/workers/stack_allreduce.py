"""Worker: one allreduce (sum and mean) of a torch tensor and one allgather_object."""

import argparse

import horovod.torch as hvd
import torch

from tests.hvdrun import write_rank_result

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()
hvd.init()
tensor = torch.tensor([(hvd.rank() + 1) * 10.0**i for i in range(4)], dtype=torch.float64)
write_rank_result(args.out, hvd.rank(), {
    "rank": hvd.rank(),
    "size": hvd.size(),
    "sum": hvd.allreduce(tensor, op=hvd.Sum, name="sum").tolist(),
    "mean": hvd.allreduce(tensor, op=hvd.Average, name="mean").tolist(),
    "gathered": hvd.allgather_object(hvd.rank()),
})
