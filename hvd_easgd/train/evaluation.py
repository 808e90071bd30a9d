"""Evaluation: the test error and loss of a model over the workers' test shards."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hvd_easgd.train.metrics import allreduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, reduce: bool,
             max_batches: Optional[int], name: str) -> Dict[str, float]:
    """{'test_error', 'test_loss'} of `model` on `loader` (at most `max_batches` batches).

    With `reduce`, correct predictions, losses and counts are summed over the workers (a
    collective named after `name`), so every worker returns the figures of the whole test set.
    Runs in eval mode under a forked RNG: the model's mode and the training RNG stream are as
    before, so evaluating does not change the training trajectory."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(1) == y).sum())
                count += y.numel()
    finally:
        model.train(was_training)
    if reduce:
        loss_sum, correct, count = allreduce_sum([loss_sum, correct, count],
                                                 name=f"hvd_easgd.eval.{name}")
    if count == 0:
        return {"test_error": float("nan"), "test_loss": float("nan")}
    return {"test_error": 1.0 - correct / count, "test_loss": loss_sum / count}
