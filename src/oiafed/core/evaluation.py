"""Evaluation of a model on labelled tensors."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from oiafed.data.arrays import ArrayDataset


def evaluate(model: nn.Module, data: ArrayDataset, batch_size: int = 1024,
             device: torch.device | None = None) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` of ``model`` on ``data``; on ``device``
    (where ``model`` is) when given, each batch moved there (default: where the data is)."""
    if len(data) == 0:
        return {"accuracy": float("nan"), "loss": float("nan")}
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = data.x[start:start + batch_size]
            y = data.y[start:start + batch_size]
            if device is not None and x.device != device:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    return {"accuracy": correct / len(data), "loss": float(loss_sum) / len(data)}
