"""Built-in models. Input shape and number of classes come from the dataset."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from oiafed.exceptions import ConfigError
from oiafed.registry import register


def _memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_size(parameters: int) -> None:
    """Refuse, before allocating anything, a model whose float32 parameters alone would not
    fit in this machine's memory (it could neither be built nor trained)."""
    memory = _memory()
    if memory is not None and 4 * parameters > memory:
        raise ConfigError(f"the model would have {parameters:,} parameters "
                          f"({4 * parameters / 2**30:,.1f} GiB as float32), more than this "
                          f"machine's memory ({memory / 2**30:,.1f} GiB)")


def _flatten(input_shape: tuple[int, ...]) -> list[nn.Module]:
    """A ``Flatten`` layer when the input is not already a feature vector."""
    return [nn.Flatten()] if len(input_shape) > 1 else []


@register("model.logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on the flattened input."""
    return nn.Sequential(*_flatten(input_shape), nn.Linear(math.prod(input_shape), num_classes))


@register("model.mlp")
def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (64,)
) -> nn.Module:
    """Fully connected network with ReLU; ``hidden: [64, 64]`` gives two hidden layers.

    YAML:
        model: {type: mlp, args: {hidden: [64]}}
    """
    if any(h < 1 for h in hidden):
        raise ConfigError(f"hidden sizes must be >= 1, got {list(hidden)}")
    widths = [math.prod(input_shape), *hidden, num_classes]
    _check_size(sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(widths)))
    layers: list[nn.Module] = _flatten(input_shape)
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register("model.cnn")
def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
) -> nn.Module:
    """Small CNN: per entry of ``channels`` a 3x3 conv, ReLU and 2x2 max-pool, then an MLP head.

    Needs image input (``C x H x W``).
    """
    if len(input_shape) != 3:
        raise ConfigError(f"cnn needs image input (C, H, W); the dataset gives {input_shape}")
    if not channels or any(c < 1 for c in channels) or hidden < 1:
        raise ConfigError("channels must be a non-empty list of sizes >= 1 and hidden >= 1")
    sizes = [input_shape[0], *channels]
    pooled = math.prod(math.ceil(side / 2 ** len(channels)) for side in input_shape[1:])
    _check_size(sum((9 * c_in + 1) * c_out for c_in, c_out in itertools.pairwise(sizes))
                + (channels[-1] * pooled + 1) * hidden + (hidden + 1) * num_classes)
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
        in_channels = out_channels
    features = nn.Sequential(*layers)
    with torch.no_grad():
        width = features(torch.zeros(1, *input_shape)).numel()
    head = [nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(features, *head)
