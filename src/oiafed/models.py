"""Built-in models. Input shape and number of classes come from the dataset."""

from __future__ import annotations

import itertools
import math
import os
from collections import OrderedDict
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


class Layers(nn.Sequential):
    """``nn.Sequential`` whose last layer is its ``head`` and the layers before it its
    ``body`` (personalized methods split models there); the state-dict keys stay
    ``nn.Sequential``'s (``0.weight``, ...)."""

    @property
    def body(self) -> nn.Sequential:
        return nn.Sequential(*list(self)[:-1])

    @property
    def head(self) -> nn.Module:
        return self[-1]


def _flatten(input_shape: tuple[int, ...]) -> list[nn.Module]:
    """A ``Flatten`` layer when the input is not already a feature vector."""
    return [nn.Flatten()] if len(input_shape) > 1 else []


@register("model.logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on the flattened input."""
    return Layers(*_flatten(input_shape), nn.Linear(math.prod(input_shape), num_classes))


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
    return Layers(*layers)


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
    return Layers(features, *head)


class BodyHead(nn.Module):
    """A feature extractor ``body`` and a last linear layer ``head``: ``head(body(x))``.

    State-dict keys start with ``body.`` or ``head.``, so a model splits into shared and
    personal parts by name.
    """

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@register("model.fedavg_cnn")
def fedavg_cnn(input_shape: tuple[int, ...], num_classes: int) -> BodyHead:
    """The CNN of McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (AISTATS 2017), Sec. 3: two 5x5 convolutions (32 and 64 channels,
    "same" padding, ReLU) each followed by 2x2 max pooling, a 512-unit fully connected layer
    with ReLU, and a softmax output (the logits here; the loss applies the softmax). On MNIST
    (1 x 28 x 28, 10 classes) it has the paper's 1,663,370 parameters.

    YAML:
        model: {type: fedavg_cnn}
    """
    if len(input_shape) != 3:
        raise ConfigError(f"fedavg_cnn needs image input (C, H, W); the dataset gives "
                          f"{input_shape}", "model.type")
    pooled = math.prod(side // 4 for side in input_shape[1:])
    if pooled == 0:
        raise ConfigError(f"fedavg_cnn needs images of at least 4 x 4; the dataset gives "
                          f"{input_shape}", "model.type")
    _check_size((25 * input_shape[0] + 1) * 32 + (25 * 32 + 1) * 64
                + (64 * pooled + 1) * 512 + 513 * num_classes)
    body = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(input_shape[0], 32, 5, padding=2)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(64 * pooled, 512)), ("relu3", nn.ReLU()),
    ]))
    return BodyHead(body, nn.Linear(512, num_classes))


@register("model.fedavg_2nn")
def fedavg_2nn(input_shape: tuple[int, ...], num_classes: int) -> BodyHead:
    """The "2NN" of McMahan et al. (AISTATS 2017), Sec. 3: a multilayer perceptron with two
    hidden layers of 200 units and ReLU, then a softmax output (the logits here). On MNIST
    (784 inputs, 10 classes) it has the paper's 199,210 parameters.

    YAML:
        model: {type: fedavg_2nn}
    """
    width = math.prod(input_shape)
    _check_size((width + 1) * 200 + 201 * 200 + 201 * num_classes)
    body = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(width, 200)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(200, 200)), ("relu2", nn.ReLU()),
    ]))
    return BodyHead(body, nn.Linear(200, num_classes))
