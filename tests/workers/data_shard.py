"""Worker for tests/train/test_data.py: each Horovod worker reports the samples its loaders give it."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from hvd_easgd.train.data import build_datasets, eval_loader, train_loader  # noqa: E402
from tests.hvdrun import write_rank_result  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    bundle = build_datasets("digits")
    n_train, n_test = len(bundle.train), len(bundle.test)
    # Same images, labels replaced by the sample's index, so batches tell which samples they hold.
    train = TensorDataset(bundle.train.tensors[0], torch.arange(n_train))
    test = TensorDataset(bundle.test.tensors[0], torch.arange(n_test))

    loader = train_loader(train, args.batch_size, rank=rank, world_size=size, seed=7)
    epochs = {}
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        seen = [int(i) for _, idx in loader for i in idx]
        epochs[epoch] = {"seen": seen, "batches": len(loader)}
    # Resume in the middle of epoch 1: skip the 2 batches already done.
    loader.sampler.set_epoch(1, start_index=2 * args.batch_size)
    resumed = [int(i) for _, idx in loader for i in idx]

    ev = eval_loader(test, 50, rank=rank, world_size=size)
    eval_seen = [int(i) for _, idx in ev for i in idx]
    total = hvd.allreduce(torch.tensor([len(eval_seen)]), op=hvd.Sum, name="eval_count")
    batches = hvd.allgather_object(epochs[0]["batches"])
    write_rank_result(args.out, rank, {
        "rank": rank, "size": size, "n_train": n_train, "n_test": n_test,
        "epoch0": epochs[0]["seen"], "epoch1": epochs[1]["seen"], "resumed": resumed,
        "batches": epochs[0]["batches"], "all_batches": batches,
        "eval": eval_seen, "eval_total": int(total.item()),
    })


if __name__ == "__main__":
    main()
