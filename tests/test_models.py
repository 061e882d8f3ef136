"""Built-in models: output shapes for the built-in datasets' input shapes, argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oiafed import registry
from oiafed.data.datasets import digits
from oiafed.exceptions import ConfigError
from oiafed.models import cnn, logreg, mlp

DIGITS_SHAPE = (1, 8, 8)
SYNTHETIC_SHAPE = (20,)


def build(model_type: str, input_shape: tuple[int, ...], num_classes: int, **args) -> nn.Module:
    return registry.build("model", {"type": model_type, "args": args}, "model",
                          input_shape=input_shape, num_classes=num_classes)


@pytest.mark.parametrize(("model_type", "args"), [
    ("logreg", {}),
    ("mlp", {}),
    ("mlp", {"hidden": [64, 32]}),
    ("cnn", {}),
    ("cnn", {"channels": [4], "hidden": 16}),
])
@pytest.mark.parametrize("batch", [1, 7])
def test_output_is_batch_by_classes_on_digit_images(model_type: str, args: dict, batch: int) -> None:
    model = build(model_type, DIGITS_SHAPE, 10, **args)
    out = model(torch.rand(batch, *DIGITS_SHAPE))
    assert out.shape == (batch, 10)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(("model_type", "args"), [("logreg", {}), ("mlp", {"hidden": [64, 32]})])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_output_is_batch_by_classes_on_synthetic_vectors(model_type: str, args: dict,
                                                         num_classes: int) -> None:
    model = build(model_type, SYNTHETIC_SHAPE, num_classes, **args)
    assert model(torch.randn(9, *SYNTHETIC_SHAPE)).shape == (9, num_classes)


def test_cnn_handles_odd_image_sizes() -> None:
    model = cnn((3, 13, 9), 4, channels=[8, 8, 8])
    assert model(torch.rand(2, 3, 13, 9)).shape == (2, 4)


def test_models_run_on_real_digits_and_gradients_reach_every_parameter() -> None:
    data = digits(seed=0)
    batch_x, batch_y = data.x[:16], data.y[:16]
    for model in (logreg(data.input_shape, 10), mlp(data.input_shape, 10, hidden=[64, 32]),
                  cnn(data.input_shape, 10)):
        loss = nn.functional.cross_entropy(model(batch_x), batch_y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mlp_hidden_sizes_become_its_layers() -> None:
    model = build("mlp", DIGITS_SHAPE, 10, hidden=[64, 32])
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(64, 64), (64, 32), (32, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2


def test_mlp_without_hidden_layers_is_logistic_regression() -> None:
    model = build("mlp", SYNTHETIC_SHAPE, 3, hidden=[])
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(20, 3)]


def test_logreg_is_one_linear_layer_on_the_flattened_input() -> None:
    model = build("logreg", DIGITS_SHAPE, 10)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(64, 10)]


@pytest.mark.parametrize("shape", [SYNTHETIC_SHAPE, (8, 8), (1, 1, 8, 8)])
def test_cnn_on_non_image_input_is_a_config_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=r"cnn needs image input"):
        cnn(shape, 10)
    with pytest.raises(ConfigError) as info:
        build("cnn", shape, 10)
    assert info.value.path == "model.args"


@pytest.mark.parametrize(("model_type", "args", "message"), [
    ("mlp", {"hidden": [64, 0]}, "hidden sizes must be >= 1"),
    ("cnn", {"channels": []}, "channels must be a non-empty list"),
    ("cnn", {"hidden": 0}, "hidden >= 1"),
    ("mlp", {"hidden": "wide"}, r"model\.args\.hidden"),
    ("mlp", {"depth": 3}, r"model\.args\.depth: unknown argument"),
])
def test_bad_model_arguments_are_config_errors(model_type: str, args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(model_type, DIGITS_SHAPE, 10, **args)


def test_input_shape_and_num_classes_are_not_config_arguments() -> None:
    with pytest.raises(ConfigError, match=r"model\.args\.num_classes"):
        registry.build("model", {"type": "logreg", "args": {"num_classes": 3}}, "model",
                       input_shape=DIGITS_SHAPE, num_classes=10)


def test_models_are_registered() -> None:
    assert {"model.logreg", "model.mlp", "model.cnn"} <= set(registry.names("model"))
    assert registry.name_of(mlp) == "model.mlp"
