"""The experiment config: pydantic schema, YAML loading, overrides, validation."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from oiafed import registry
from oiafed.exceptions import ConfigError

SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter where PyYAML has it (4x faster), else the pure-Python one."""

INJECTED_ARGS = {"model": {"input_shape", "num_classes"},
                 "dataset": {"seed", "num_clients", "test_fraction"}}
"""Arguments oiafed passes to components itself (never set in a config). A dataset always gets
``seed``, and ``num_clients``/``test_fraction`` (from ``data``) when its signature names them."""


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
"""The device names a config may give (``device``, ``runtime.device``)."""

MAX_CONFIG_DEPTH = 32
"""How deeply a config's mappings and lists may nest (the top level is 0)."""
MAX_CONFIG_SIZE = 2_000_000
"""The most characters a config may take written out as JSON, each YAML alias expanded where
it is used (a config is usually a few thousand): aliases of aliases cannot blow up a small file
into a huge ``config.yaml``, or into huge arguments of a component that takes ``**kwargs``."""


def check_device_name(value: str) -> str:
    """``value`` when it is a device name a config may give (else a ValueError, which the
    schema reports naming the key)."""
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps; got {value!r}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Component(_Strict):
    """A ``{type, args}`` section: the registry name (kind implied) and its arguments."""

    type: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)


# Sections whose ``type`` may be left out (it takes the default shown).


class ModelSection(Component):
    type: str = Field("mlp", min_length=1)


class TrainerSection(Component):
    type: str = Field("default", min_length=1)


class LearnerSection(Component):
    type: str = Field("default", min_length=1)


class AggregatorSection(Component):
    type: str = Field("fedavg", min_length=1)


class PartitionSection(Component):
    type: str = Field("iid", min_length=1)


class DataConfig(_Strict):
    type: str = Field("digits", min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    num_clients: int = Field(10, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    test_set: Literal["auto", "official", "split"] = "auto"
    """The global test set: ``official``, the dataset's own test set (``mnist``'s 10,000 test
    images; the training images alone are partitioned); ``split``, a stratified
    ``test_fraction`` of all the dataset's samples pooled; ``auto``, ``official`` for a dataset
    that has one, else ``split``."""
    local_test_fraction: float = Field(0.0, ge=0, lt=1)
    """The share of every client's data held out as its local test set (stratified per class
    where the client has enough samples of it), on which each client's personal model is
    evaluated every ``eval_every`` rounds (0: no personal evaluation)."""
    partition: PartitionSection = Field(default_factory=PartitionSection)


class SecureAggregationConfig(_Strict):
    """``runtime.secure_aggregation`` (gRPC only): the server learns only the sum of each
    round's updates (Bonawitz et al., CCS 2017; ``oiafed.secagg``)."""

    threshold: int | None = Field(None, ge=2)
    """The fewest clients that must survive every step of a round, else the round fails
    (default: a majority of the round's clients, at least 2): a round of n clients survives
    n - threshold dropouts, and the server with fewer than threshold clients learns only
    the sum."""
    precision_bits: int = Field(24, ge=1, le=48)
    """Fraction bits of the fixed-point updates: the mean is exact to 2**-(bits+1)."""
    bound: float = Field(4.0, gt=0, le=2.0**20)
    """Each coordinate of a client's update (its weights minus the global ones) is clipped
    to [-bound, bound] before it is encoded."""
    step_timeout: float | None = Field(None, gt=0)
    """Seconds each step waits for the round's clients before it goes on without the
    missing ones (default: the round's deadline, trainer.args.round_timeout)."""


class RuntimeConfig(_Strict):
    """Where learners train. Fields a mode does not use are ignored by it."""

    mode: Literal["serial", "parallel", "ray", "grpc"] = "serial"
    checkpoint_every: int = Field(1, ge=0)
    """Save the resumable run state every this many rounds (0: never)."""
    checkpoint_interval: float = Field(1.0, ge=0)
    """...but at most once per this many seconds (0: no limit); the last and a stopping round
    are always saved. A crash costs at most this much redone training."""
    workers: int | None = Field(None, ge=1)
    """parallel: worker processes (default: the CPU count); ray: actors (default: cluster CPUs)."""
    threads: int | None = Field(None, ge=1)
    """Torch threads in each worker process (default 1)."""
    address: str | None = None
    """ray: ``auto`` or ``HOST:PORT`` of a cluster (default: a local one); grpc: ``HOST:PORT``
    the server listens on (default: a loopback deployment, one client process per client)."""
    min_join: int | None = Field(None, ge=1)
    """grpc: clients that must have joined before the first round (default: all of them)."""
    join_timeout: float | None = Field(None, gt=0)
    """grpc: seconds the server waits for them (default: no limit; 300 on loopback)."""
    hello_timeout: float = Field(10.0, gt=0)
    """grpc: seconds a new stream has to say Hello before the server closes it."""
    max_streams: int | None = Field(None, ge=1)
    """grpc: the most streams the server holds open at once (default: twice the number of
    clients, plus 16); more are refused, and their clients retry."""
    max_task_bytes: int = Field(1 << 32, ge=1 << 20)
    """grpc: the largest task a client accepts, in bytes (default 4 GiB); a larger one is
    answered with an error, never allocated."""
    num_cpus_per_client: float = Field(1.0, gt=0)
    """ray: CPUs reserved by each actor."""
    num_gpus_per_client: float = Field(0.0, ge=0)
    """ray: GPUs reserved by each actor (fractional: several actors share a GPU)."""
    device: str | None = None
    """The learners' device (default: the top-level ``device``); parallel: workers share the
    visible GPUs round-robin when it is ``cuda`` (or ``auto`` on a CUDA machine)."""
    resident: bool = False
    """Keep the clients' cached data on the learners' device between rounds."""
    secure_aggregation: SecureAggregationConfig | None = None
    """grpc: aggregate each round's updates securely (``SecureAggregationConfig``)."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        return value if value is None else check_device_name(value)


class ExperimentConfig(_Strict):
    """A whole experiment. Every field has a default, so ``{}`` is a valid config (an empty
    YAML file is not: ``read_yaml``)."""

    name: str = Field("experiment", min_length=1, pattern=r"^[\w.-]+$")
    seed: int = Field(0, ge=0)
    output_dir: str = "runs"
    imports: list[str] = Field(default_factory=list)
    strict: bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    learner: LearnerSection = Field(default_factory=LearnerSection)
    aggregator: AggregatorSection = Field(default_factory=AggregatorSection)
    callbacks: list[Component] = Field(default_factory=list)
    attack: Component | None = None
    """A simulated Byzantine attack (``attack.*`` registry names): which clients it controls
    (``args.fraction`` or ``args.clients``) and what they send."""
    privacy: Component | None = None
    """Differential privacy (``privacy.*`` registry names): ``central`` (user-level DP-FedAvg
    on the server) or ``local`` (sample-level DP-SGD on the clients), with their arguments."""
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    device: str = "auto"
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``:
    the server's (global model, evaluation, aggregation; the CPU for ``mps``, which has no
    float64) and the learners' device."""
    precision: Literal["32", "bf16", "16-mixed"] = "32"
    """Training precision: ``bf16`` autocast (CPU or GPU), ``16-mixed`` (CUDA: float16
    autocast and a gradient scaler)."""
    deterministic: bool = False
    """Deterministic algorithms only, in every process that trains (``device.py``)."""
    report: bool = False
    """Write the run's report (plots and ``report.html``, ``oiafed report``) when it ends."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device_name(value)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def sections(self) -> list[tuple[str, str, Component | DataConfig]]:
        """Every component section as ``(kind, key path, section)``."""
        found: list[tuple[str, str, Component | DataConfig]] = [
            ("dataset", "data", self.data),
            ("partitioner", "data.partition", self.data.partition),
            ("model", "model", self.model),
            ("trainer", "trainer", self.trainer),
            ("learner", "learner", self.learner),
            ("aggregator", "aggregator", self.aggregator),
        ]
        found += [("callback", f"callbacks[{i}]", cb) for i, cb in enumerate(self.callbacks)]
        if self.attack is not None:
            found.append(("attack", "attack", self.attack))
        if self.privacy is not None:
            found.append(("privacy", "privacy", self.privacy))
        return found

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=SafeDumper, sort_keys=False)


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(config)"


def check_size(raw: Any) -> None:
    """Refuse a config that nests deeper than ``MAX_CONFIG_DEPTH`` or is larger than
    ``MAX_CONFIG_SIZE`` characters written out as JSON, each YAML alias expanded where it is
    used (what ``config.yaml`` and the components would get). It stops at the bounds and never
    recurses, so neither a deep nor an exponential config costs more than the bound.

    Raises:
        ConfigError: naming where the bound was crossed.
    """
    size = 0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(raw, ())]
    while stack:
        value, loc = stack.pop()
        if len(loc) > MAX_CONFIG_DEPTH:
            raise ConfigError(f"nested deeper than {MAX_CONFIG_DEPTH} levels", _short_path(loc))
        if isinstance(value, dict):
            size += 2 + len(value) + sum(len(str(key)) + 3 for key in value)
            children: Any = ((item, (*loc, str(key))) for key, item in value.items())
        elif isinstance(value, list | tuple):
            size += 2 + len(value)
            children = ((item, (*loc, i)) for i, item in enumerate(value))
        else:
            size += len(value) + 2 if isinstance(value, str) else len(repr(value))
            children = ()
        if size > MAX_CONFIG_SIZE:
            raise ConfigError(
                f"the config is larger than {MAX_CONFIG_SIZE:,} characters written out (as "
                "JSON, each YAML alias expanded where it is used)", _short_path(loc))
        stack.extend(children)


def _short_path(loc: tuple[Any, ...]) -> str:
    return _path(loc[:4]) + ("..." if len(loc) > 4 else "")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (a clear error if it is missing, empty or malformed).

    An empty file (or one of comments only) is an error, not a default experiment; a file
    holding ``{}`` is every default, as is the dict ``{}`` given to ``load_config``.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a bad date, an int too long
        raise ConfigError(f"{file} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{file} nests too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    if data is None:  # nothing, or only comments: most likely the wrong file
        raise ConfigError(f"{file} is empty; write the settings to change (`{{}}` runs every "
                          "default)")
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.path=value`` overrides (values parsed as YAML).

    List items are addressed by index: ``callbacks.0.args.patience=3``.
    """
    result = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else map(_split_override, overrides)
    for key, value in items:
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} has an empty part; use key.path=value")
        node: Any = result
        for depth, name in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            part: str | int = name
            if isinstance(node, list):
                if not name.isdigit() or int(name) >= len(node):
                    raise ConfigError(f"no list item {name!r} in override {key!r}", where)
                part = int(name)
            elif not isinstance(node, dict):
                parent = ".".join(parts[:depth])
                raise ConfigError(f"cannot set {key!r}: {parent} holds a value, not a section", parent)
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return result


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError):
        parsed = value
    except RecursionError:
        raise ConfigError(f"override {key.strip()!r} nests too deeply (at most "
                          f"{MAX_CONFIG_DEPTH} levels)") from None
    return key.strip(), parsed


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a config dict against the schema (errors name every bad key path)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = ("unknown key" if err["type"] == "extra_forbidden"
                       else err["msg"].removeprefix("Value error, "))
            problems.append(f"{_path(err['loc'])}: {message}")
        raise ConfigError("invalid config: " + "; ".join(problems)) from exc


def check_components(cfg: ExperimentConfig, folder: str | Path | None = None) -> None:
    """Import ``imports`` (module names also looked for in ``folder``, the config file's, and
    the working directory), then check every section's type is registered and its args fit."""
    registry.import_modules(cfg.imports, folder=folder)
    pair_halves(cfg)
    for kind, path, section in cfg.sections():
        target = registry.get(kind, section.type, path=f"{path}.type")
        registry.validate_args(target, section.args, f"{path}.args", INJECTED_ARGS.get(kind, set()))
    checked = [("privacy", cfg.privacy)] if cfg.privacy is not None else []
    checked += [("callback", section) for section in cfg.callbacks]
    for kind, section in checked:  # components that refuse configs they cannot serve
        check = getattr(registry.get(kind, section.type), "check_config", None)
        if check is not None:
            check(cfg)
    if cfg.runtime.secure_aggregation is not None:
        from oiafed.secagg.checks import check_config

        check_config(cfg)
    if cfg.runtime.mode == "ray":
        check_ray_devices(cfg)


def check_ray_devices(cfg: ExperimentConfig) -> None:
    """Ray shows an actor only the GPUs it reserves: learners on ``cuda`` need
    ``runtime.num_gpus_per_client`` > 0, and an actor's GPU is ``cuda`` (``cuda:0``;
    ``cuda:N`` names one it does not see).

    Raises:
        ConfigError: naming ``runtime.num_gpus_per_client`` or the learners' device key.
    """
    name = cfg.runtime.device or cfg.device
    if not name.startswith("cuda"):
        return
    if cfg.runtime.num_gpus_per_client == 0:
        raise ConfigError(f"learners on {name} in Ray actors need a GPU share: Ray hides every "
                          "GPU from an actor that reserves none; set it, e.g. 0.25 (four actors "
                          "per GPU)", "runtime.num_gpus_per_client")
    if name not in ("cuda", "cuda:0"):
        raise ConfigError(f"{name} in a Ray actor: the actor sees only the GPU Ray gives it, "
                          "as cuda; set runtime.device: cuda",
                          "runtime.device" if cfg.runtime.device else "device")


def pair_halves(cfg: ExperimentConfig) -> None:
    """Give the algorithm its client half: a config naming no learner (``default``) gets the
    one the aggregator's ``client_half`` names; a learner that does not fit is refused.

    Raises:
        ConfigError: naming ``learner.type`` (or ``aggregator.type``) when the two halves do
            not belong together.
    """
    server = registry.get("aggregator", cfg.aggregator.type, path="aggregator.type")
    needed = getattr(server, "client_half", None)
    if needed is not None and cfg.learner.type == "default":
        cfg.learner.type = needed
    client = registry.get("learner", cfg.learner.type, path="learner.type")
    if needed is not None:
        wanted = registry.get("learner", needed)
        if not (isinstance(client, type) and issubclass(client, wanted)):
            raise ConfigError(
                f"aggregator {cfg.aggregator.type!r} trains its clients with learner {needed!r} "
                f"(or a subclass of it); got {cfg.learner.type!r}: leave learner.type out",
                "learner.type")
    partner = getattr(client, "server_half", None)
    if partner is not None:
        wanted = registry.get("aggregator", partner)
        if not (isinstance(server, type) and issubclass(server, wanted)):
            raise ConfigError(
                f"learner {cfg.learner.type!r} is the client half of aggregator {partner!r}; "
                f"got aggregator {cfg.aggregator.type!r}: set aggregator.type: {partner} and "
                "leave learner.type out", "aggregator.type")


def fill_defaults(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of ``cfg`` whose every component section lists all the arguments its registered
    type takes, each argument left out set to its constructor default (``config.yaml`` of a
    run folder: what the run used). It validates and runs the same as ``cfg``."""
    filled = cfg.model_copy(deep=True)
    for kind, _, section in filled.sections():
        target = registry.get(kind, section.type)
        section.args = registry.with_defaults(target, section.args, INJECTED_ARGS.get(kind, set()))
    return filled


def load_config(
    source: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: list[str] | dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Load, override and validate a config from a YAML path or a dict.

    ``imports`` resolve against the config file's folder (a dict's: the working directory):
    see ``registry.resolve_imports``.

    Raises:
        ConfigError: naming the key path of every problem found.
    """
    folder: Path | None = None
    if isinstance(source, ExperimentConfig):
        raw = source.model_dump(mode="json")
    elif isinstance(source, dict):
        raw = source
    else:
        raw = read_yaml(source)
        folder = Path(source).parent
    check_size(raw)
    if overrides:
        raw = apply_overrides(raw, overrides)
        check_size(raw)
    cfg = parse_config(raw)
    cfg.imports = registry.resolve_imports(cfg.imports, folder)
    check_components(cfg, folder)
    return cfg
