"""Weights and messages on the wire, never pickled.

Tensors travel as safetensors bytes (a JSON header with dtype, shape and offsets, then the raw
buffers); messages travel as JSON. Whatever is received is parsed and checked, never executed.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.numpy import save as _save_arrays
from safetensors.torch import load as _load_tensors
from safetensors.torch import save as _save_tensors

from oiafed.core.types import ClientUpdate, Weights
from oiafed.exceptions import WireError


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> bytes:
    """Safetensors bytes of CPU, contiguous ``tensors`` (with string ``metadata``)."""
    try:  # through NumPy views: the same bytes, without torch's extra copies
        return _save_arrays({k: v.numpy() for k, v in tensors.items()}, metadata=metadata)
    except TypeError:  # a dtype NumPy lacks (bfloat16, ...)
        return _save_tensors(tensors, metadata=metadata)


def encode_weights(weights: Weights) -> bytes:
    """Weights as safetensors bytes (CPU, contiguous)."""
    return tensor_bytes({k: v.detach().cpu().contiguous() for k, v in weights.items()})


def decode_weights(data: bytes | bytearray | memoryview) -> Weights:
    """Weights from safetensors bytes.

    Raises:
        WireError: when ``data`` is not a valid safetensors buffer.
    """
    try:
        return _load_tensors(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WireError(f"malformed tensor payload: {exc}") from exc


def encode_json(message: dict[str, Any]) -> bytes:
    """A message as UTF-8 JSON (non-finite floats allowed, as in metrics)."""
    return json.dumps(message, allow_nan=True, separators=(",", ":")).encode("utf-8")


def decode_json(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A message from UTF-8 JSON; it must be an object.

    Raises:
        WireError: when ``data`` is not a JSON object.
    """
    try:
        message = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"malformed message: {exc}") from exc
    if not isinstance(message, dict):
        raise WireError(f"a message must be a JSON object, got {type(message).__name__}")
    return message


def update_header(update: ClientUpdate) -> dict[str, Any]:
    """The JSON part of a ``ClientUpdate`` (the weights travel separately)."""
    return {"client_id": update.client_id, "num_samples": update.num_samples,
            "metrics": {k: float(v) for k, v in update.metrics.items()}}


def update_from_wire(header: dict[str, Any], payload: bytes | bytearray | memoryview
                     ) -> ClientUpdate:
    """A ``ClientUpdate`` from its JSON header and safetensors payload, with types checked.

    Raises:
        WireError: on a missing field or a value of the wrong type.
    """
    client_id, num_samples = header.get("client_id"), header.get("num_samples")
    metrics = header.get("metrics")
    if not isinstance(client_id, str) or not client_id:
        raise WireError(f"update without a client_id: {header!r:.200}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
        raise WireError(f"update of {client_id}: num_samples must be an integer >= 0")
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in metrics.items()
    ):
        raise WireError(f"update of {client_id}: metrics must map names to numbers")
    return ClientUpdate(client_id, num_samples, {k: float(v) for k, v in metrics.items()},
                        decode_weights(payload))
