"""A sweep's grid: the ``--set KEY=V1,V2`` values and seeds, one cell (a run folder) per
grid point and seed, every cell's config checked before anything is written."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oiafed.config import ExperimentConfig, fill_defaults, load_config
from oiafed.exceptions import ConfigError, InputError
from oiafed.io import atomic_write_json
from oiafed.run import validate
from oiafed.sweep.lock import LOCK_FILE

SWEEP_FILE = "sweep.json"
"""The sweep folder's record: its base config, its keys and the cells run into it."""
FORMAT = 1
_UNSAFE = re.compile(r"[^\w.+-]")
_OPENERS, _CLOSERS = "[{(", "]})"


@dataclass(frozen=True)
class Axis:
    """One swept key and its values, as written on the command line (each parsed as YAML)."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a grid point (a value per key) and a seed."""

    point: tuple[tuple[str, str], ...]
    """``(key, value)`` in the order of the sweep's keys."""
    seed: int

    @property
    def label(self) -> str:
        """The grid point's folder name: ``k1=v1,k2=v2`` (``base`` for a sweep of seeds only)."""
        return ",".join(f"{key}={_safe(value)}" for key, value in self.point) or "base"

    @property
    def folder(self) -> str:
        """The cell's run folder, relative to the sweep folder."""
        return f"{self.label}/seed={self.seed}"

    def overrides(self) -> list[str]:
        """What a solo ``oiafed run`` of this cell adds to the sweep's own overrides."""
        return [*(f"{key}={value}" for key, value in self.point), f"seed={self.seed}"]


def _safe(value: str) -> str:
    """``value`` as part of a folder name: characters other than letters, digits and
    ``._+-`` become ``_``."""
    return _UNSAFE.sub("_", value.strip()) or "_"


def split_values(text: str) -> list[str]:
    """``V1,V2`` split at the commas outside brackets and quotes (``[64,64],[32]`` is two
    values), each stripped."""
    values, start, depth, quote = [], 0, 0, ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_axes(settings: list[str]) -> list[Axis]:
    """The ``--set KEY=V1,V2`` options as axes.

    Raises:
        ConfigError: naming the option that is malformed, sets ``seed`` (``--seeds`` does)
            or repeats a key, or whose values are empty or repeated.
    """
    axes: list[Axis] = []
    for setting in settings:
        key, sep, text = setting.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {setting!r} must look like key.path=value1,value2")
        if key == "seed":
            raise ConfigError("give the seeds with --seeds, not --set", key)
        if any(axis.key == key for axis in axes):
            raise ConfigError("given twice with --set; list all its values in one --set", key)
        values = split_values(text)
        if not all(values):
            raise ConfigError(f"--set {setting!r} has an empty value", key)
        if len({_safe(v) for v in values}) < len(values):
            raise ConfigError(f"--set {setting!r} repeats a value (or two values that name the "
                              "same folder)", key)
        axes.append(Axis(key, tuple(values)))
    return axes


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` as integers (None when not given).

    Raises:
        ConfigError: naming ``--seeds`` for a value that is not an integer >= 0, or repeated.
    """
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds must be integers separated by commas, got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {text!r}")
    return seeds


@dataclass
class Plan:
    """A sweep ready to run: its base config, folder and cells, each cell's config valid."""

    config: Path
    overrides: list[str]
    """The sweep's own ``KEY=VALUE`` overrides, given to every cell before its grid values."""
    base: ExperimentConfig
    folder: Path
    keys: list[str]
    cells: list[Cell]

    def cell_dir(self, cell: Cell) -> Path:
        return self.folder / cell.folder

    def cell_overrides(self, cell: Cell) -> list[str]:
        return [*self.overrides, *cell.overrides()]

    def record(self) -> None:
        """Write ``sweep.json`` (made with the folder): the base config, the keys and every
        cell run into the folder so far, this plan's included."""
        known = _read_record(self.folder)
        cells = [] if known is None else list(known.get("cells", []))
        for cell in self.cells:
            entry = {"point": dict(cell.point), "seed": cell.seed, "folder": cell.folder}
            if entry not in cells:
                cells.append(entry)
        atomic_write_json(self.folder / SWEEP_FILE, {
            "format": FORMAT, "keys": self.keys, "config": _identity(self.base), "cells": cells})


def plan(config: str | Path, overrides: list[str], settings: list[str], seeds: str | None,
         sweep_dir: str | Path | None) -> Plan:
    """Check the whole sweep and return its plan; nothing is written.

    Every value of every key is checked on its own (an error names that key and value), then
    every cell's whole config. A sweep folder that already holds a sweep must hold one of the
    same base config and keys (its cells are then reused: more values or seeds extend it).

    Raises:
        ConfigError: naming the key (and value) that fails, or the one that differs from the
            sweep already in the folder.
    """
    axes = parse_axes(settings)
    seed_list = parse_seeds(seeds)
    base = validate(config, overrides)
    for axis in axes:
        for value in axis.values:
            _check(config, [*overrides, f"{axis.key}={value}"], f"--set {axis.key}={value}",
                   axis.key)
    points = itertools.product(*[[(axis.key, v) for v in axis.values] for axis in axes])
    cells = [Cell(tuple(point), seed) for point in points for seed in (seed_list or [base.seed])]
    folder = Path(sweep_dir) if sweep_dir is not None else Path(base.output_dir) / f"{base.name}-sweep"
    result = Plan(Path(config), list(overrides), base, folder, [axis.key for axis in axes], cells)
    for cell in cells:
        _check(config, result.cell_overrides(cell), f"sweep cell {cell.folder}", None)
    check_folder(result)
    return result


def _check(config: str | Path, overrides: list[str], what: str, key: str | None) -> None:
    with naming(what, key):
        validate(config, overrides)


@contextlib.contextmanager
def naming(what: str, key: str | None) -> Iterator[None]:
    """A ``ConfigError`` raised in the block, again with ``what`` (a value, a cell) before its
    message and naming ``key`` (None: the key it names)."""
    try:
        yield
    except ConfigError as exc:
        error = ConfigError(f"{what}: {exc}")
        error.path = key or exc.path
        raise error from exc


def _identity(cfg: ExperimentConfig) -> dict[str, Any]:
    return fill_defaults(cfg).model_dump(mode="json")


def _read_record(folder: Path) -> dict[str, Any] | None:
    file = folder / SWEEP_FILE
    if not file.exists():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {file}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{file} is not a sweep record of this oiafed version")
    return record


def check_folder(sweep: Plan) -> None:
    """Refuse a sweep folder holding a sweep of another base config or other keys, or cells
    that are not run folders of this sweep."""
    if sweep.folder.exists() and not sweep.folder.is_dir():
        raise InputError(f"the sweep folder {sweep.folder} is a file")
    record = _read_record(sweep.folder)
    if record is None:
        if sweep.folder.exists() and any(p.name != LOCK_FILE for p in sweep.folder.iterdir()):
            raise InputError(f"{sweep.folder} is not empty and holds no {SWEEP_FILE}: choose "
                             "another --sweep-dir")
        return
    where = f"{sweep.folder / SWEEP_FILE}"
    if sorted(record.get("keys", [])) != sorted(sweep.keys):
        raise ConfigError(
            f"the sweep in {sweep.folder} sweeps {', '.join(record.get('keys', [])) or 'seeds only'}"
            f", not {', '.join(sweep.keys) or 'seeds only'} ({where}); give the same --set keys "
            "(other values or seeds extend it) or another --sweep-dir", "--set")
    sweep.keys = list(record["keys"])
    order = {key: i for i, key in enumerate(sweep.keys)}
    sweep.cells = [Cell(tuple(sorted(cell.point, key=lambda kv: order[kv[0]])), cell.seed)
                   for cell in sweep.cells]
    difference = _first_difference(record.get("config"), _identity(sweep.base))
    if difference is not None:
        key, old, new = difference
        raise ConfigError(
            f"the sweep in {sweep.folder} was run with {old!r}, this one has {new!r} "
            f"({where}); run this config into another --sweep-dir", key)


def _first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """``(dotted key, old, new)`` of the first value that differs, None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in [*old, *(k for k in new if k not in old)]:
            found = _first_difference(old.get(name), new.get(name), f"{key}.{name}".lstrip("."))
            if found is not None:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found = _first_difference(a, b, f"{key}.{i}")
            if found is not None:
                return found
        return None
    return None if old == new else (key or "(config)", old, new)


def load_cell_config(sweep: Plan, cell: Cell) -> ExperimentConfig:
    """The config a cell runs (what ``oiafed run CONFIG OVERRIDES`` of it loads)."""
    return load_config(sweep.config, sweep.cell_overrides(cell))
