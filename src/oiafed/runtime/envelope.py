"""The one message format between the trainer and the clients, in every runtime.

A message is one safetensors payload: a versioned JSON header (in the payload's metadata, key
``oiafed``) and a body of named tensors, ``weights/<name>`` for the model and ``extra/<name>``
for what an algorithm adds. Three kinds travel:

* ``round``: what every client of a round gets (round number, fit config, global weights, the
  algorithm's broadcast extras), encoded once per round;
* ``client``: one client's own part (its id, its training seed, per-client extras);
* ``update``: a client's answer (sample count, local metrics, weights, extras).

Runtimes move these bytes without looking inside; only this module knows the layout. Nothing is
pickled; whatever is decoded is checked field by field, and a bad message is a ``WireError``.
"""

from __future__ import annotations

import json
from typing import Any

from oiafed.client_state import CLIENT_ID_PATTERN
from oiafed.core.types import JSON, ClientTask, ClientUpdate, RoundTask, Tensors, Weights
from oiafed.exceptions import WireError
from oiafed.runtime.tensors import Payload, decode_payload

PROTOCOL = 4
"""The message (and gRPC wire) protocol version; a peer of another version is refused
(4: secure aggregation's ``SecAgg`` messages and ``masked`` inputs)."""

HEADER_KEY = "oiafed"
MAX_METRICS = 1000
"""The most metrics an update may carry (each becomes a column of ``metrics.jsonl``)."""
MAX_METRIC_NAME = 200
"""The longest metric name an update may carry, in characters."""
WEIGHTS, EXTRA = "weights/", "extra/"


def _pack(kind: str, header: dict[str, JSON], weights: Weights, extras: Tensors) -> Payload:
    tensors = {WEIGHTS + k: v for k, v in weights.items()}
    tensors.update((EXTRA + k, v) for k, v in extras.items())
    try:
        text = json.dumps({"v": PROTOCOL, "kind": kind, **header}, allow_nan=True,
                          separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise WireError(f"a {kind} message must hold JSON values: {exc}") from exc
    return Payload(tensors, {HEADER_KEY: text})


def _unpack(data: bytes | bytearray | memoryview, kind: str
            ) -> tuple[dict[str, Any], Weights, Tensors]:
    tensors, metadata = decode_payload(data)
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, ValueError) as exc:
        raise WireError(f"a {kind} message without a JSON header") from exc
    if not isinstance(header, dict):
        raise WireError(f"a {kind} message's header is not a JSON object")
    if header.get("v") != PROTOCOL:
        raise WireError(f"a {kind} message of protocol {header.get('v')!r}; this end speaks "
                        f"{PROTOCOL}: run the same oiafed version on both ends")
    if header.get("kind") != kind:
        raise WireError(f"expected a {kind} message, got {header.get('kind')!r}")
    weights: Weights = {}
    extras: Tensors = {}
    for name, tensor in tensors.items():
        if name.startswith(WEIGHTS):
            weights[name[len(WEIGHTS):]] = tensor
        elif name.startswith(EXTRA):
            extras[name[len(EXTRA):]] = tensor
        else:
            raise WireError(f"a {kind} message holds a tensor of no known group: {name!r:.100}")
    return header, weights, extras


def _values(header: dict[str, Any], kind: str) -> dict[str, JSON]:
    values = header.get("values", {})
    if not isinstance(values, dict):
        raise WireError(f"a {kind} message's values must be a JSON object")
    return values


def _int(header: dict[str, Any], key: str, kind: str) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"a {kind} message's {key} must be an integer >= 0, got {value!r:.60}")
    return value


def _client_id(header: dict[str, Any], kind: str) -> str:
    value = header.get("client_id")
    if not isinstance(value, str) or not value:
        raise WireError(f"a {kind} message without a client_id")
    if not CLIENT_ID_PATTERN.fullmatch(value):
        raise WireError(f"a {kind} message's client_id {value!r:.80} is not a valid client id")
    return value


def pack_round(task: RoundTask) -> Payload:
    """A round's broadcast part, ready to be written whole or in pieces.

    Raises:
        WireError: when the config or extra values are not JSON.
    """
    return _pack("round", {"round": task.round_num, "config": task.config,
                           "values": task.extra_values}, task.weights, task.extra_tensors)


def encode_round(task: RoundTask) -> bytes:
    """A round's broadcast part as bytes (``pack_round``, whole)."""
    return pack_round(task).to_bytes()


def decode_round(data: bytes | bytearray | memoryview) -> RoundTask:
    """A ``RoundTask`` from ``encode_round``'s bytes (checked).

    Raises:
        WireError: when ``data`` is not a round message.
    """
    header, weights, extras = _unpack(data, "round")
    config = header.get("config")
    if not isinstance(config, dict):
        raise WireError("a round message's config must be a JSON object")
    return RoundTask(_int(header, "round", "round"), weights, config, extras,
                     _values(header, "round"))


def encode_client(task: ClientTask) -> bytes:
    """One client's part of a task as bytes."""
    return _pack("client", {"client_id": task.client_id, "seed": task.seed,
                            "values": task.extra_values}, {}, task.extra_tensors).to_bytes()


def decode_client(data: bytes | bytearray | memoryview) -> ClientTask:
    """A ``ClientTask`` from ``encode_client``'s bytes (checked).

    Raises:
        WireError: when ``data`` is not a client message.
    """
    header, _, extras = _unpack(data, "client")
    return ClientTask(_client_id(header, "client"), _int(header, "seed", "client"), extras,
                      _values(header, "client"))


def pack_update(update: ClientUpdate) -> Payload:
    """A client's update, ready to be written whole or in pieces."""
    metrics = {k: float(v) for k, v in update.metrics.items()}
    return _pack("update", {"client_id": update.client_id, "num_samples": update.num_samples,
                            "metrics": metrics, "values": update.extra_values},
                 update.weights, update.extra_tensors)


def encode_update(update: ClientUpdate) -> bytes:
    """A client's update as bytes (``pack_update``, whole)."""
    return pack_update(update).to_bytes()


def decode_update(data: bytes | bytearray | memoryview) -> ClientUpdate:
    """A ``ClientUpdate`` from ``encode_update``'s bytes, with every field's type checked.

    Raises:
        WireError: on a missing field or a value of the wrong type.
    """
    header, weights, extras = _unpack(data, "update")
    client_id = _client_id(header, "update")
    metrics = header.get("metrics")
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in metrics.items()
    ):
        raise WireError(f"update of {client_id}: metrics must map names to numbers")
    if len(metrics) > MAX_METRICS:
        raise WireError(f"update of {client_id}: {len(metrics)} metrics, more than the "
                        f"{MAX_METRICS} allowed")
    if (longest := max(map(len, metrics), default=0)) > MAX_METRIC_NAME:
        raise WireError(f"update of {client_id}: a metric name of {longest} characters, more "
                        f"than the {MAX_METRIC_NAME} allowed")
    return ClientUpdate(client_id, _int(header, "num_samples", "update"),
                        {k: float(v) for k, v in metrics.items()}, weights, extras,
                        _values(header, "update"))


def json_problem(values: dict[str, Any]) -> str | None:
    """Why ``values`` cannot travel as JSON, naming the first bad entry (None: it can)."""
    try:
        json.dumps(values, allow_nan=True)
        return None
    except (TypeError, ValueError):
        pass
    for key, value in values.items():
        if not isinstance(key, str):
            return f"the key {key!r} is not a string"
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as exc:
            return f"[{key!r}] = {value!r:.60} is not JSON ({exc})"
    return "it is not JSON"
