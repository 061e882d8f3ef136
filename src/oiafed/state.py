"""A run's resumable state, written atomically after rounds, never pickled.

The file is safetensors: every tensor of the state (global weights, RNG states, any tensor a
component keeps) is stored as a tensor, and everything else as JSON in the file's metadata,
where each tensor is referenced as ``{"__tensor__": name}``. The metadata also holds the
SHA-256 of the JSON and of every tensor (name, dtype, shape, bytes), so damage is detected
(a checksum, not a signature: whoever can write the file can recompute it).

Reading (``load_state``) checks everything before a caller applies any of it: the checksum,
every tensor reference, and the type and range of every saved value (``StateFile``).
Version 2 files (written before the checksum) are read without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import reprlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from oiafed.exceptions import InputError
from oiafed.runtime.codec import tensor_bytes

STATE_FILE = "state.safetensors"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
"""Version 2 is version 3 without the checksum."""
TENSOR = "__tensor__"
STATE_KEY = "oiafed_state"
CHECKSUM_KEY = "oiafed_sha256"
MAX_ROUND = 10**9
"""The largest ``round_num`` a state file may hold."""
_MT_WORDS = 624  # the Mersenne Twister's state words (Python's and NumPy's)
_TORCH_RNG_SHAPE = tuple(torch.Generator().get_state().shape)


def _tensor_check(dtype: torch.dtype, shape: tuple[int, ...],
                  below: int | None = None) -> AfterValidator:
    """A check that a tensor is of exactly ``dtype`` and ``shape`` (and its values in
    ``[0, below)``)."""

    def check(value: torch.Tensor) -> torch.Tensor:
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise ValueError(f"must be a {dtype} tensor of shape {list(shape)}, not "
                             f"{value.dtype} {list(value.shape)}")
        if below is not None and (int(value.min()) < 0 or int(value.max()) >= below):
            raise ValueError(f"values must be in [0, {below})")
        return value

    return AfterValidator(check)


def _python_index(value: tuple[int, torch.Tensor, float | None]
                  ) -> tuple[int, torch.Tensor, float | None]:
    """Python's state ends with the position in its words: at most their number."""
    if int(value[1][-1]) > _MT_WORDS:
        raise ValueError(f"the last word (the position) must be at most {_MT_WORDS}")
    return value


_Finite = Annotated[StrictFloat, AllowInfNan(False)]
_PythonWords = Annotated[torch.Tensor, _tensor_check(torch.int64, (_MT_WORDS + 1,), 2**32)]
_NumpyWords = Annotated[torch.Tensor, _tensor_check(torch.int64, (_MT_WORDS,), 2**32)]
_TorchRng = Annotated[torch.Tensor, _tensor_check(torch.uint8, _TORCH_RNG_SHAPE)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class TrainerState(_Schema):
    """``Trainer.state_dict()`` as saved (without the history): what each value may be.
    Tensors' fit to the model and components is checked by their ``load_state_dict``."""

    round_num: Annotated[StrictInt, Field(ge=0, le=MAX_ROUND)]
    weights: dict[StrictStr, torch.Tensor]
    aggregator: dict[StrictStr, Any]
    callbacks: dict[StrictStr, dict[StrictStr, Any]]
    should_stop: StrictBool
    stopped_by: StrictStr | None
    stop_reason: StrictStr | None
    fit_config: dict[StrictStr, JsonValue]
    history: list[dict[StrictStr, Any]] | None
    privacy: dict[StrictStr, JsonValue] = Field(default_factory=dict)
    """The ``privacy:`` section's state (central: the adaptive clip; local: the clients'
    accounting histories); empty without one (and in states saved before it existed)."""


class RngState(_Schema):
    """The global random states, as ``_storable_rng`` writes them."""

    python: Annotated[tuple[Literal[3], _PythonWords, _Finite | None],
                      AfterValidator(_python_index)]
    numpy: tuple[Literal["MT19937"], _NumpyWords, Annotated[StrictInt, Field(ge=0, le=_MT_WORDS)],
                 Annotated[StrictInt, Field(ge=0, le=1)], _Finite]
    torch: _TorchRng


class StateFile(_Schema):
    """The whole state file's tree (tensors in place of their references)."""

    version: StrictInt
    trainer: TrainerState
    rng: RngState


def capture_rng() -> dict[str, Any]:
    """The global random states user code may draw from (Python, NumPy, torch), as of now.

    Cheap (it runs in the round loop, at each save): the conversion to storable form waits
    for ``encode_snapshot``. Every part is a fresh object, safe to encode later.
    """
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def _storable_rng(raw: dict[str, Any]) -> dict[str, Any]:
    """``capture_rng()``'s states as tensors and JSON values (what ``restore_rng`` reads)."""
    version, internal, gauss = raw["python"]
    name, keys, pos, has_gauss, cached = raw["numpy"]
    return {
        "python": [version, torch.from_numpy(np.array(internal, dtype=np.int64)), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": raw["torch"],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global random states to ``state`` (``load_state``'s ``"rng"``, checked)."""
    _set_rng(state, random.setstate, np.random.set_state, torch.set_rng_state)


def _rng_problem(state: dict[str, Any]) -> str | None:
    """Why ``state`` cannot be restored (None: it can), found by restoring it into fresh
    generators: the global ones are not touched."""
    try:
        _set_rng(state, random.Random().setstate, np.random.RandomState().set_state,
                 torch.Generator().set_state)
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        return f"rng: {exc}"
    return None


def _set_rng(state: dict[str, Any], python: Callable[[Any], object],
             numpy: Callable[[Any], object], torch_: Callable[[torch.Tensor], object]) -> None:
    """Give ``state``'s parts to the ``setstate`` functions of the three generators."""
    version, internal, gauss = state["python"]
    python((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    numpy((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch_(state["torch"])


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with each tensor copied into ``tensors`` and replaced by a reference."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {TENSOR: name}
    if isinstance(value, dict):
        return {str(k): _split_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split_tensors(v, tensors) for v in value]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """``value`` with each reference replaced by its tensor.

    Raises:
        ValueError: naming where a reference names no tensor of ``tensors``.
    """
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            name = value[TENSOR]
            if not isinstance(name, str) or name not in tensors:
                raise ValueError(f"{where or 'the state'} refers to tensor "
                                 f"{reprlib.repr(name)}, which the file does not hold")
            return tensors[name]
        return {k: _join_tensors(v, tensors, f"{where}.{k}" if where else k)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors, f"{where}.{i}") for i, v in enumerate(value)]
    return value


@dataclass(frozen=True)
class Snapshot:
    """A run state taken after a round, detached from the live objects, not yet encoded."""

    trainer_json: str
    tensors: dict[str, torch.Tensor]
    rng: dict[str, Any]


def take_snapshot(trainer_state: dict[str, Any]) -> Snapshot:
    """Copy ``trainer_state`` (its tensors, as JSON the rest) and the RNG states, now.

    Raises:
        TypeError: when the state holds a value that is neither a tensor nor JSON-able.
    """
    tensors: dict[str, torch.Tensor] = {}
    trainer_json = json.dumps(_split_tensors(trainer_state, tensors))
    return Snapshot(trainer_json, tensors, capture_rng())


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The bytes of the state file for ``snapshot``."""
    tensors = dict(snapshot.tensors)
    rng_json = json.dumps(_split_tensors(_storable_rng(snapshot.rng), tensors))
    tree = f'{{"version": {FORMAT_VERSION}, "trainer": {snapshot.trainer_json}, "rng": {rng_json}}}'
    return encode_state(tree, tensors)


def encode_state(tree: str, tensors: dict[str, torch.Tensor]) -> bytes:
    """The bytes of a state file of ``tree`` (JSON text referencing ``tensors`` by name) and
    ``tensors`` (CPU, contiguous), with their checksum."""
    return tensor_bytes(tensors, metadata={STATE_KEY: tree,
                                           CHECKSUM_KEY: _checksum(tree, tensors)})


def _checksum(tree: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of ``tree`` and of each tensor's name, dtype, shape and bytes (by name)."""
    digest = hashlib.sha256(tree.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def decode_state(data: bytes) -> dict[str, Any]:
    """The state tree, tensors in place, from the bytes of a state file; its checksum,
    version and tensor references checked (the values: ``load_state``).

    Raises:
        ValueError: saying why ``data`` is not an intact oiafed state file.
    """
    try:
        tensors = load_tensors(data)  # validates the whole file first
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size])["__metadata__"]
        text = metadata[STATE_KEY]
        tree = json.loads(text)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    checksum = metadata.get(CHECKSUM_KEY)
    if checksum is not None and checksum != _checksum(text, tensors):
        raise ValueError("checksum mismatch: the file changed after it was written")
    version = tree.get("version") if isinstance(tree, dict) else None
    if version not in READABLE_VERSIONS:
        raise ValueError(f"not an oiafed state file of version "
                         f"{' or '.join(map(str, READABLE_VERSIONS))} (its version: "
                         f"{reprlib.repr(version)})")
    if checksum is None and version >= 3:
        raise ValueError(f"no checksum, which every version {version} file has")
    try:
        return _join_tensors(tree, tensors)
    except RecursionError:
        raise ValueError("its JSON is nested too deeply") from None


class StateWriter:
    """Writes the state file atomically in a background thread, one write in flight at most.

    ``submit`` only takes a snapshot (copies of the tensors, the rest as JSON, the RNG states);
    encoding, the file write and fsync overlap with the next round. After a crash the file
    holds the last state whose write completed; a resumed run redoes the rounds after it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_FILE
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def submit(self, trainer_state: dict[str, Any]) -> None:
        self.submit_snapshot(take_snapshot(trainer_state))

    def submit_snapshot(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` (after the write in flight, if any)."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oiafed-state")
        self._pending = self._executor.submit(self._write, snapshot)

    def _write(self, snapshot: Snapshot) -> None:
        """Temp file, fsync, rename: the file is always a whole state, old or new.

        One writer per run folder, so the temp name is fixed. The folder is not fsynced: after
        a power cut the rename may be lost, which leaves the previous (valid) state.
        """
        data = encode_snapshot(snapshot)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def wait(self) -> None:
        """Block until the write in flight is on disk (re-raising its error, if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def load_state(run_dir: Path, why: str = "cannot resume") -> dict[str, Any]:
    """Read and check the whole state file (``decode_state``, then every value against
    ``StateFile``, and the random states by restoring them into fresh generators).

    Raises:
        InputError: starting with ``why``, naming the file and what is wrong, when it is
            missing, damaged or holds a value it cannot hold.
    """
    file = run_dir / STATE_FILE
    if not file.is_file():
        raise InputError(f"{why}: {file} does not exist (checkpoint_every 0, or the run "
                         "stopped before its first save)")
    try:
        state = decode_state(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{why}: {file} is unreadable or corrupt ({exc})") from exc
    try:
        StateFile.model_validate(state)
    except ValidationError as exc:
        raise InputError(f"{why}: {file} holds invalid values ({_problems(exc)})") from None
    problem = _rng_problem(state["rng"])
    if problem is not None:
        raise InputError(f"{why}: {file} holds invalid values ({problem})")
    return state


def _problems(error: ValidationError, shown: int = 3) -> str:
    """The first ``shown`` problems of ``error``, each as ``where: what (got value)``."""
    problems = []
    for item in error.errors()[:shown]:
        where = ".".join(str(part) for part in item["loc"]) or "the state"
        got = "" if item["type"] == "missing" else f" (got {reprlib.repr(item['input'])})"
        problems.append(f"{where}: {item['msg']}{got}")
    more = error.error_count() - shown
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
