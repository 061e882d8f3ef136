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

from oiafed.core.types import Weights
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
