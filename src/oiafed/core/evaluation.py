"""Evaluation of a model on labelled tensors."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from oiafed.data.arrays import ArrayDataset
from oiafed.device import accumulator_dtype


def evaluate(model: nn.Module, data: ArrayDataset, batch_size: int = 1024,
             device: torch.device | None = None) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` of ``model`` on ``data``; on ``device``
    (where ``model`` is) when given, each batch moved there (default: where the data is)."""
    if len(data) == 0:
        return {"accuracy": float("nan"), "loss": float("nan")}
    was_training = model.training
    model.eval()
    where = device if device is not None else data.x.device
    # the sums stay where the model is: one sync at the end, not one per batch
    loss_sum = torch.zeros((), dtype=accumulator_dtype(where), device=where)
    correct = torch.zeros((), dtype=torch.int64, device=where)
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = data.x[start:start + batch_size]
            y = data.y[start:start + batch_size]
            if x.device != where:
                x, y = x.to(where, non_blocking=True), y.to(where, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").to(loss_sum.dtype)
            correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    return {"accuracy": int(correct) / len(data), "loss": float(loss_sum) / len(data)}
