"""Named tensors as one safetensors payload (``encode_payload``), read back into tensors that
share the receive buffer (``decode_payload``, ``Assembler`` for a payload that arrives in
chunks). Every message between processes (``envelope``) is such a payload, with its JSON
header in the safetensors metadata.

The format is safetensors' (an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte offsets, then the raw data), so ``codec.decode_weights`` reads
what is written here and the other way round. Reading here saves copies of a large model:
``Assembler`` copies each received chunk once into one buffer whose tensors are views, where
joining and ``codec.decode_weights`` copy twice more.

The reader trusts nothing: the header must be a JSON object of entries with a known dtype, a
shape of non-negative integers and offsets that match the shape and tile the data exactly; any
other payload is a ``WireError``. Nothing is unpickled or executed.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any

import torch

from oiafed.core.types import Weights
from oiafed.exceptions import WireError
from oiafed.runtime.codec import decode_weights, tensor_bytes

CHUNK_SIZE = 1 << 20
"""Bytes of weights per Chunk message, well under gRPC's 4 MiB message limit."""

MAX_HEADER = 100 << 20
"""The largest JSON header accepted (as in safetensors)."""

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
"""The dtypes read as views of the buffer; others take the safetensors library's path."""

_BY_NAME = {name: dtype for dtype, name in DTYPES.items()}
_NATIVE = sys.byteorder == "little"
"""Tensors can be views of the (little-endian) payload: the machine's byte order is the same."""


class Payload:
    """Named tensors and string metadata laid out as safetensors, not yet copied anywhere: a
    header and views of the tensors' memory. ``to_bytes()`` writes it whole and ``pieces()`` in
    chunks, each copying every byte once.

    Tensors are laid out largest element first (then by name), so every tensor starts at an
    offset aligned to its element size.
    """

    def __init__(self, tensors: Weights, metadata: dict[str, str] | None = None) -> None:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        if not _NATIVE or any(t.dtype not in DTYPES for t in tensors.values()):
            self.segments = [memoryview(tensor_bytes(tensors, metadata))]
        else:
            self.segments = _layout(tensors, metadata)
        self._keep = tensors  # the views above point into these
        self.size = sum(len(segment) for segment in self.segments)

    def to_bytes(self) -> bytes:
        """The whole payload."""
        return b"".join(self.segments)

    def pieces(self, size: int = CHUNK_SIZE) -> list[bytes]:
        """The payload in pieces of ``size`` bytes (the last may be shorter)."""
        pieces: list[bytes] = []
        parts: list[memoryview] = []
        filled = 0
        for segment in self.segments:
            start = 0
            while start < len(segment):
                take = min(size - filled, len(segment) - start)
                parts.append(segment[start:start + take])
                filled += take
                start += take
                if filled == size:
                    pieces.append(b"".join(parts))
                    parts, filled = [], 0
        if parts:
            pieces.append(b"".join(parts))
        return pieces


def _layout(tensors: Weights, metadata: dict[str, str] | None) -> list[memoryview]:
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    segments: list[memoryview] = []
    offset = 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        tensor = tensors[name]
        length = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + length]}
        if length:
            segments.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy().data))
        offset += length
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    segments.insert(0, memoryview(struct.pack("<Q", len(text)) + text))
    return segments


def encode_payload(tensors: Weights, metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` and ``metadata`` as one safetensors payload (``decode_payload`` reads it)."""
    return Payload(tensors, metadata).to_bytes()


def decode_payload(data: bytes | bytearray | memoryview) -> tuple[Weights, dict[str, str]]:
    """Tensors and metadata of a safetensors payload. The tensors are views of ``data`` when it
    is writable (a ``bytearray`` or a view of one), else of a private copy.

    Raises:
        WireError: when ``data`` is not a well-formed payload.
    """
    if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly):
        return decode_buffer_with_metadata(data)
    return decode_buffer_with_metadata(bytearray(data))


def decode_buffer(buffer: bytearray | memoryview) -> Weights:
    """Weights from safetensors bytes; the tensors are views of ``buffer`` (no copy).

    Raises:
        WireError: when ``buffer`` is not a well-formed payload.
    """
    return decode_buffer_with_metadata(buffer)[0]


def decode_buffer_with_metadata(buffer: bytearray | memoryview
                                ) -> tuple[Weights, dict[str, str]]:
    """``decode_buffer``, and the payload's string metadata.

    Raises:
        WireError: when ``buffer`` is not a well-formed payload.
    """
    view = memoryview(buffer)
    if len(view) < 8:
        raise WireError("malformed tensor payload: shorter than its header")
    (length,) = struct.unpack_from("<Q", view, 0)
    if length > min(len(view) - 8, MAX_HEADER):
        raise WireError(f"malformed tensor payload: a header of {length} bytes does not fit")
    try:
        header = json.loads(bytes(view[8:8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"malformed tensor payload: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError("malformed tensor payload: its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireError("malformed tensor payload: __metadata__ is not an object of strings")
    base, data_size = 8 + length, len(view) - 8 - length
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"malformed tensor payload: bad entry for {name!r}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str):
            raise WireError(f"malformed tensor payload: bad dtype for {name!r}")
        if dtype_name not in _BY_NAME or not _NATIVE:  # valid, maybe: the library decides
            return decode_weights(bytes(view)), metadata
        if not (isinstance(shape, list) and all(_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_size):
            raise WireError(f"malformed tensor payload: bad shape or offsets for {name!r}")
        dtype = _BY_NAME[dtype_name]
        numel = math.prod(shape)
        if offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise WireError(f"malformed tensor payload: {name!r} has {offsets[1] - offsets[0]} "
                            f"bytes for shape {shape} of {dtype_name}")
        spans.append((offsets[0], offsets[1], name, dtype, shape, numel))
    position = 0
    for start, end, name, *_ in sorted(spans, key=lambda s: s[:2]):
        if start != position:
            raise WireError(f"malformed tensor payload: {name!r} does not follow the data before it")
        position = end
    if position != data_size:
        raise WireError(f"malformed tensor payload: {data_size - position} bytes belong to no tensor")
    weights: Weights = {}
    for start, _, name, dtype, shape, numel in spans:
        if numel == 0:
            weights[name] = torch.empty(shape, dtype=dtype)
        elif (base + start) % dtype.itemsize:  # unaligned (not laid out by Payload): copy
            data = bytearray(view[base + start:base + start + numel * dtype.itemsize])
            weights[name] = torch.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            weights[name] = torch.frombuffer(buffer, dtype=dtype, count=numel,
                                             offset=base + start).reshape(shape)
    return weights, metadata


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Assembler:
    """Receives the chunks of one payload of a declared size into one buffer.

    Raises:
        WireError: when the declared size is over ``limit`` or the chunks exceed it.
    """

    def __init__(self, size: int, limit: int) -> None:
        if size > limit:
            raise WireError(f"a payload of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.received = 0
        self.buffer = bytearray(size)

    def add(self, data: bytes) -> bool:
        """Add a chunk; True once the payload is complete."""
        end = self.received + len(data)
        if end > self.size:
            raise WireError(f"more bytes than the {self.size} declared")
        self.buffer[self.received:end] = data
        self.received = end
        return self.done

    @property
    def done(self) -> bool:
        return self.received == self.size

    def weights(self) -> Weights:
        """The payload's weights (views of the buffer).

        Raises:
            WireError: when the payload is malformed.
        """
        return decode_buffer(self.buffer)
