"""The registry: names <-> objects, replacement, name format, building from {type, args}."""

from __future__ import annotations

import logging

import pytest

from oiafed import registry
from oiafed.core.aggregators import FedAvg
from oiafed.exceptions import ConfigError, RegistryError


class Widget:
    def __init__(self, size: int = 1, label: str = "w") -> None:
        if size > 100:
            raise ValueError("size must be <= 100")
        self.size = size
        self.label = label


def test_register_get_names_name_of(clean_registry: None) -> None:
    assert registry.register("callback.widget")(Widget) is Widget  # the decorator returns it
    assert registry.get("callback", "widget") is Widget
    assert registry.get("callback", "callback.widget") is Widget  # full name also accepted
    assert "callback.widget" in registry.names("callback")
    assert "callback.widget" not in registry.names("aggregator")
    assert registry.name_of(Widget) == "callback.widget"
    assert registry.name_of(Widget()) == "callback.widget"  # an instance: by its class
    assert registry.name_of(object()) is None


def test_names_are_sorted_and_filtered_by_kind() -> None:
    every = registry.names()
    assert every == sorted(every)
    models = registry.names("model")
    assert models == sorted(models)
    assert {"model.cnn", "model.logreg", "model.mlp"} <= set(models)
    assert all(n.startswith("model.") for n in models)
    assert set(models) < set(every)
    assert "aggregator.fedavg" in every


def test_factory_functions_register_too(clean_registry: None) -> None:
    @registry.register("model.tiny_test_model")
    def tiny(input_shape: tuple[int, ...], num_classes: int, width: int = 2) -> tuple:
        return input_shape, num_classes, width

    built = registry.build("model", {"type": "tiny_test_model", "args": {"width": 5}}, "model",
                           input_shape=(3,), num_classes=4)
    assert built == ((3,), 4, 5)
    assert registry.name_of(tiny) == "model.tiny_test_model"


def test_registering_again_replaces_and_warns(clean_registry: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    registry.register("aggregator.test_swap")(Widget)

    class Other:
        pass

    with caplog.at_level(logging.WARNING, logger="oiafed.registry"):
        registry.register("aggregator.test_swap")(Other)
    assert registry.get("aggregator", "test_swap") is Other
    assert registry.name_of(Other) == "aggregator.test_swap"
    assert registry.name_of(Widget) is None  # its old name now builds something else
    assert any("aggregator.test_swap" in r.getMessage() for r in caplog.records)
    # Registering the same object again is silent.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="oiafed.registry"):
        registry.register("aggregator.test_swap")(Other)
    assert not caplog.records


def test_a_builtin_can_be_overridden_on_purpose(clean_registry: None) -> None:
    class MyFedAvg(FedAvg):
        pass

    registry.register("aggregator.fedavg")(MyFedAvg)
    assert isinstance(registry.build("aggregator", {"type": "fedavg"}), MyFedAvg)
    assert registry.name_of(MyFedAvg()) == "aggregator.fedavg"
    assert registry.name_of(FedAvg) is None


def test_clean_registry_restores_the_builtins() -> None:
    assert registry.get("aggregator", "fedavg") is FedAvg
    with pytest.raises(RegistryError):
        registry.get("callback", "widget")


@pytest.mark.parametrize("name", ["widget", "gadget.widget", "callback.", ".widget", "Callback.x", ""])
def test_bad_name_format_is_a_registry_error(name: str) -> None:
    with pytest.raises(RegistryError, match=r"'<kind>\.<name>'") as info:
        registry.register(name)
    assert info.value.name == name
    assert isinstance(info.value, ConfigError)  # a user error: the CLI exits with 2


def test_unknown_kind_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="unknown kind 'gadget'"):
        registry.get("gadget", "x")


def test_unknown_name_lists_known_and_suggests() -> None:
    with pytest.raises(RegistryError) as info:
        registry.get("model", "logreggg", path="model.type")
    error = info.value
    assert (error.name, error.suggestion, error.path) == ("model.logreggg", "logreg", "model.type")
    assert {"cnn", "logreg", "mlp"} <= set(error.known)
    assert str(error).startswith("model.type: unknown model 'logreggg'. Did you mean 'logreg'?")


def test_build_validates_and_converts_arguments(clean_registry: None) -> None:
    registry.register("callback.widget")(Widget)
    widget = registry.build("callback", {"type": "widget", "args": {"size": "7"}}, "callbacks[2]")
    assert isinstance(widget, Widget)
    assert widget.size == 7 and widget.label == "w"
    with pytest.raises(ConfigError, match=r"callbacks\[2\]\.args\.colour: unknown argument; "
                                          "widget takes size, label"):
        registry.build("callback", {"type": "widget", "args": {"colour": "red"}}, "callbacks[2]")
    with pytest.raises(ConfigError, match=r"callbacks\[2\]\.args\.size: widget's argument size "
                                          "expects int, got 'big': Input should be a valid integer"):
        registry.build("callback", {"type": "widget", "args": {"size": "big"}}, "callbacks[2]")


def test_a_bad_argument_names_the_component_and_what_it_expects() -> None:
    # model.type switched from mlp to cnn, the mlp's hidden: [64] left behind
    with pytest.raises(ConfigError) as info:
        registry.validate_args(registry.get("model", "cnn"), {"hidden": [64]}, "model.args",
                               {"input_shape", "num_classes"})
    assert str(info.value) == ("model.args.hidden: cnn's argument hidden expects int, got [64]: "
                               "Input should be a valid integer")
    with pytest.raises(ConfigError) as info:
        registry.validate_args(registry.get("model", "cnn"), {"channels": [8, "x"]}, "model.args",
                               {"input_shape", "num_classes"})
    assert str(info.value).startswith("model.args.channels: cnn's argument channels expects "
                                      "Sequence[int], got [8, 'x']: item 1: Input should be")


def test_describe_gives_the_summary_and_arguments(clean_registry: None) -> None:
    @registry.register("callback.described_test")
    class Described:
        """Does a thing.

        More text.
        """

        def __init__(self, needed: float, size: int = 3, *args: object, **rest: object) -> None:
            pass

    info = registry.describe("callback", "described_test", {"size"})
    assert info.name == "callback.described_test"
    assert info.summary == "Does a thing."
    assert info.arguments == [registry.ArgumentInfo("needed", "float", None)]
    assert info.injected == ["size"] and info.any_other


def test_build_turns_constructor_value_errors_into_config_errors(clean_registry: None) -> None:
    registry.register("callback.widget")(Widget)
    with pytest.raises(ConfigError) as info:
        registry.build("callback", {"type": "widget", "args": {"size": 101}}, "callbacks[0]")
    assert info.value.path == "callbacks[0].args"
    assert "size must be <= 100" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def test_build_accepts_any_argument_for_kwargs_targets(clean_registry: None) -> None:
    @registry.register("callback.open_test")
    class Open:
        def __init__(self, first: int = 0, **rest: object) -> None:
            self.first = first
            self.rest = rest

    built = registry.build("callback", {"type": "open_test", "args": {"first": 2, "x": [1]}})
    assert (built.first, built.rest) == (2, {"x": [1]})


def test_injected_arguments_cannot_come_from_the_config() -> None:
    with pytest.raises(ConfigError) as info:
        registry.build("model", {"type": "logreg", "args": {"num_classes": 3}}, "model",
                       input_shape=(4,), num_classes=2)
    assert info.value.path == "model.args.num_classes"
