"""The experiment config: schema errors name key paths, overrides, imports, YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oiafed import Callback, register, registry
from oiafed.config import ExperimentConfig, apply_overrides, load_config, read_yaml
from oiafed.exceptions import ConfigError, RegistryError


def config_error(raw: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(raw, overrides)
    return str(info.value)


@pytest.fixture
def patience_callback(clean_registry: None) -> type:
    @register("callback.test_patience")
    class TestPatience(Callback):
        def __init__(self, patience: int = 3, metric: str = "accuracy") -> None:
            self.patience = patience
            self.metric = metric

    return TestPatience


# -- defaults and round trip --------------------------------------------------------------------


def test_empty_config_is_valid_with_documented_defaults() -> None:
    cfg = load_config({})
    assert cfg.name == "experiment" and cfg.seed == 0 and cfg.strict is False
    assert (cfg.data.type, cfg.data.num_clients, cfg.data.test_fraction) == ("digits", 10, 0.2)
    assert cfg.data.partition.type == "iid"
    assert (cfg.model.type, cfg.trainer.type, cfg.learner.type, cfg.aggregator.type) == (
        "mlp", "default", "default", "fedavg")
    assert cfg.callbacks == [] and cfg.imports == []


def test_resolved_config_written_as_yaml_loads_back_the_same() -> None:
    cfg = load_config({
        "name": "round-trip", "seed": 7,
        "data": {"type": "digits", "args": {"flatten": True}, "num_clients": 4,
                 "partition": {"type": "dirichlet", "args": {"alpha": 0.3}}},
        "model": {"type": "mlp", "args": {"hidden": [16, 8]}},
        "trainer": {"args": {"rounds": 2}},
        "callbacks": [{"type": "progress"}],
    })
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.model.args == {"hidden": [16, 8]}


# -- unknown keys, wrong types, bad values ------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ({"epochs": 3}, "epochs: unknown key"),
    ({"data": {"num_client": 3}}, "data.num_client: unknown key"),
    ({"data": {"partition": {"type": "iid", "argz": {}}}}, "data.partition.argz: unknown key"),
    ({"callbacks": [{"type": "progress", "arg": {}}]}, "callbacks[0].arg: unknown key"),
    ({"runtime": {"gpus": 2}}, "runtime.gpus: unknown key"),
    ({"trainer": {"args": {"rounds": 3, "roundz": 3}}}, "trainer.args.roundz: unknown argument"),
])
def test_unknown_keys_are_named(raw: dict, expected: str) -> None:
    assert expected in config_error(raw)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"trainer": {"args": {"rounds": "many"}}},
     "trainer.args.rounds: the default trainer's argument rounds expects int, got 'many': "
     "Input should be a valid integer"),
    ({"data": {"num_clients": "ten"}}, "data.num_clients: Input should be a valid integer"),
    ({"data": {"partition": {"type": "dirichlet", "args": {"alpha": "big"}}}},
     "data.partition.args.alpha: dirichlet's argument alpha expects float, got 'big': "
     "Input should be a valid number"),
    ({"seed": 1.5}, "seed: Input should be a valid integer"),
    ({"strict": "maybe"}, "strict: Input should be a valid boolean"),
    ({"callbacks": {"type": "progress"}}, "callbacks: Input should be a valid list"),
    ({"callbacks": [{"args": {}}]}, "callbacks[0].type: Field required"),
    ({"model": {"type": "mlp", "args": {"hidden": "wide"}}}, "model.args.hidden"),
])
def test_wrong_types_are_named(raw: dict, expected: str) -> None:
    assert expected in config_error(raw)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"data": {"num_clients": 0}}, "data.num_clients: Input should be greater than or equal to 1"),
    ({"data": {"test_fraction": 1.0}}, "data.test_fraction: Input should be less than 1"),
    ({"name": "my run"}, "name: String should match pattern"),
    ({"runtime": {"mode": "cluster"}}, "runtime.mode: Input should be 'serial', 'parallel', 'ray' or 'grpc'"),
])
def test_bad_values_are_named(raw: dict, expected: str) -> None:
    assert expected in config_error(raw)


def test_every_problem_is_reported_at_once() -> None:
    message = config_error({"data": {"num_clients": "x", "test_fraction": 2}, "epochs": 1})
    for path in ("data.num_clients", "data.test_fraction", "epochs"):
        assert path in message


def test_callback_argument_errors_name_the_list_index(patience_callback: type) -> None:
    raw = {"callbacks": [{"type": "progress"}, {"type": "test_patience", "args": {"patience": "x"}}]}
    assert ("callbacks[1].args.patience: test_patience's argument patience expects int, got 'x': "
            "Input should be a valid integer") in config_error(raw)
    raw = {"callbacks": [{"type": "test_patience", "args": {"patiance": 2}}]}
    assert "callbacks[0].args.patiance: unknown argument" in config_error(raw)
    cfg = load_config({"callbacks": [{"type": "test_patience", "args": {"patience": "4"}}]})
    assert cfg.callbacks[0].type == "test_patience"


def test_values_a_component_rejects_name_its_section_and_argument() -> None:
    """Range checks live in the components; they fire when the run builds them."""
    cfg = load_config({"trainer": {"args": {"rounds": 0}},
                       "data": {"partition": {"type": "dirichlet", "args": {"alpha": 0}}}})
    with pytest.raises(ConfigError, match=r"^trainer\.args: rounds must be >= 1"):
        registry.build("trainer", cfg.trainer.model_dump(), "trainer")
    with pytest.raises(ConfigError, match=r"^data\.partition\.args: alpha must be > 0"):
        registry.build("partitioner", cfg.data.partition.model_dump(), "data.partition")


def test_arguments_oiafed_sets_cannot_be_configured() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"model": {"type": "logreg", "args": {"input_shape": [64]}}})
    assert info.value.path == "model.args.input_shape"
    assert "set by oiafed" in str(info.value)
    assert "data.args.seed" in config_error({"data": {"args": {"seed": 3}}})


# -- unknown component types --------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "path", "suggestion"), [
    ({"aggregator": {"type": "fedavgg"}}, "aggregator.type", "fedavg"),
    ({"model": {"type": "mpl"}}, "model.type", "mlp"),
    ({"data": {"type": "digit"}}, "data.type", "digits"),
    ({"data": {"partition": {"type": "dirichlet_"}}}, "data.partition.type", "dirichlet"),
    ({"callbacks": [{"type": "progress"}, {"type": "progres"}]}, "callbacks[1].type", "progress"),
])
def test_unknown_type_lists_known_names_and_suggests_the_closest(raw: dict, path: str,
                                                                 suggestion: str) -> None:
    with pytest.raises(RegistryError) as info:
        load_config(raw)
    error = info.value
    assert error.path == path
    assert error.suggestion == suggestion
    assert suggestion in error.known
    message = str(error)
    assert message.startswith(f"{path}: unknown ")
    assert f"Did you mean {suggestion!r}?" in message
    kind = error.name.split(".", 1)[0]
    for known in registry.names(kind):
        assert known.split(".", 1)[1] in message


def test_unknown_type_far_from_any_name_has_no_suggestion() -> None:
    with pytest.raises(RegistryError) as info:
        load_config({"model": {"type": "transformer_xl_9000"}})
    assert info.value.suggestion is None
    assert "Did you mean" not in str(info.value)
    assert "Known models: cnn, fedavg_2nn, fedavg_cnn, logreg, mlp" in str(info.value)


# -- overrides ----------------------------------------------------------------------------------


BASE = {"trainer": {"args": {"rounds": 3}},
        "callbacks": [{"type": "progress"}, {"type": "test_patience", "args": {"patience": 2}}]}


def test_override_replaces_a_value_parsed_as_yaml(patience_callback: type) -> None:
    cfg = load_config(BASE, ["trainer.args.rounds=5", "strict=true", "model.args.hidden=[8, 4]",
                             "data.test_fraction=0.25", "name=tuned"])
    assert cfg.trainer.args["rounds"] == 5
    assert cfg.strict is True
    assert cfg.model.args["hidden"] == [8, 4]
    assert cfg.data.test_fraction == 0.25
    assert cfg.name == "tuned"


def test_override_creates_nested_sections(patience_callback: type) -> None:
    cfg = load_config(BASE, ["learner.args.lr=0.1", "data.partition.type=dirichlet",
                             "data.partition.args.alpha=0.3"])
    assert cfg.learner.args == {"lr": 0.1}
    assert cfg.data.partition.type == "dirichlet"
    assert cfg.data.partition.args == {"alpha": 0.3}


def test_override_addresses_list_items_by_index(patience_callback: type) -> None:
    cfg = load_config(BASE, ["callbacks.1.args.patience=7", "callbacks.1.args.metric=loss"])
    assert cfg.callbacks[1].args == {"patience": 7, "metric": "loss"}
    assert cfg.callbacks[0].args == {}
    # An override into a list item is checked like the file: wrong type, named by index.
    message = config_error(BASE, ["callbacks.1.args.patience=soon"])
    assert "callbacks[1].args.patience" in message


def test_overrides_as_a_dict_and_the_source_is_left_alone() -> None:
    raw = {"trainer": {"args": {"rounds": 3}}}
    result = apply_overrides(raw, {"trainer.args.rounds": 9, "callbacks": []})
    assert result == {"trainer": {"args": {"rounds": 9}}, "callbacks": []}
    assert raw == {"trainer": {"args": {"rounds": 3}}}


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.args.rounds", "must look like key.path=value"),
    ("=5", "must look like key.path=value"),
    ("trainer..rounds=1", "has an empty part"),
    ("callbacks.5.args.patience=1", "callbacks.5: no list item '5'"),
    ("callbacks.first.args.patience=1", "callbacks.first: no list item 'first'"),
    ("callbacks.-1.args.patience=1", "no list item '-1'"),
    ("trainer.args.rounds.max=1", "trainer.args.rounds: cannot set"),
    ("seed.value=1", "seed: Input should be a valid integer"),
])
def test_bad_override_syntax_is_a_config_error(patience_callback: type, override: str,
                                               expected: str) -> None:
    assert expected in config_error(BASE, [override])


# -- imports ------------------------------------------------------------------------------------


CUSTOM_CALLBACK = """
    from oiafed import Callback, register


    @register("callback.counting")
    class Counting(Callback):
        def __init__(self, every: int = 1) -> None:
            self.every = every
"""


def test_imports_load_a_user_module_that_registers_a_callback(user_module) -> None:
    user_module("my_fl_callbacks", CUSTOM_CALLBACK)
    raw = {"callbacks": [{"type": "counting", "args": {"every": 2}}]}
    with pytest.raises(RegistryError, match=r"callbacks\[0\]\.type: unknown callback 'counting'"):
        load_config(raw)
    cfg = load_config({**raw, "imports": ["my_fl_callbacks"]})
    assert cfg.imports == ["my_fl_callbacks"]
    counting = registry.get("callback", "counting")
    assert counting.__module__ == "my_fl_callbacks"
    built = registry.build("callback", cfg.callbacks[0].model_dump(), "callbacks[0]")
    assert built.every == 2
    assert "callbacks[0].args.every" in config_error(
        {"imports": ["my_fl_callbacks"], "callbacks": [{"type": "counting", "args": {"every": "x"}}]})


def test_imports_of_a_missing_module_names_its_index(user_module) -> None:
    user_module("my_fl_ok", "X = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config({"imports": ["my_fl_ok", "my_fl_missing_module"]})
    assert info.value.path == "imports[1]"
    assert "my_fl_missing_module" in str(info.value)


# -- YAML files ---------------------------------------------------------------------------------


def test_yaml_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: from-file\ntrainer:\n  args: {rounds: 4}\n", encoding="utf-8")
    cfg = load_config(path, ["trainer.args.rounds=6"])
    assert (cfg.name, cfg.trainer.args["rounds"]) == ("from-file", 6)
    assert isinstance(load_config(str(path)), ExperimentConfig)


@pytest.mark.parametrize(("text", "expected"), [
    ("- a\n- b\n", "must hold a mapping at the top level, got list"),
    ("just a string\n", "must hold a mapping at the top level, got str"),
    ("name: [unclosed\n", "is not valid YAML"),
])
def test_yaml_file_that_is_not_a_mapping_is_a_config_error(tmp_path: Path, text: str,
                                                           expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


@pytest.mark.parametrize("text", ["", "\n", "# nothing here\n"])
def test_empty_yaml_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty"):
        read_yaml(path)
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty"):
        load_config(path)


def test_a_yaml_file_holding_an_empty_mapping_is_the_default_config(tmp_path: Path) -> None:
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n", encoding="utf-8")
    assert load_config(path) == load_config({})


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
