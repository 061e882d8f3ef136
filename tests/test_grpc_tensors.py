"""Tensor payloads (``runtime/tensors.py``): the safetensors format, received in chunks into one
buffer and read back without extra copies by both decoders; malformed payloads are
``WireError``s, never crashes."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from oiafed.runtime.codec import WireError, decode_weights, encode_weights
from oiafed.runtime.tensors import Assembler, decode_buffer, encode_payload

WEIGHTS = {
    "layer.weight": torch.randn(7, 5, generator=torch.Generator().manual_seed(1)),
    "layer.bias": torch.randn(7, dtype=torch.float64),
    "steps": torch.arange(3, dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "half": torch.randn(2, 3).to(torch.bfloat16),
    "bytes": torch.arange(5, dtype=torch.uint8),
    "scalar": torch.tensor(0.25),
    "empty": torch.zeros(0, 4),
    "strided": torch.randn(4, 6)[:, ::2],  # not contiguous
}


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def encode_chunks(weights, size=1 << 20):
    """``weights`` as one payload, cut into pieces of at most ``size`` bytes (as gRPC sends it)."""
    payload = encode_payload(weights)
    return len(payload), [payload[i:i + size] for i in range(0, len(payload), size)]


def received(weights, size):
    total, pieces = encode_chunks(weights, size)
    assert all(0 < len(p) <= size for p in pieces)
    assert sum(len(p) for p in pieces) == total
    assembler = Assembler(total, limit=total)
    done = [assembler.add(p) for p in pieces]
    assert done == [False] * (len(pieces) - 1) + [True]
    return b"".join(pieces), assembler.weights()


@pytest.mark.parametrize("size", [1, 3, 8, 64, 1 << 20])
def test_chunks_of_any_size_reassemble_bit_for_bit(size):
    payload, back = received(WEIGHTS, size)
    assert_same(back, WEIGHTS)
    assert_same(decode_weights(payload), WEIGHTS)  # the safetensors library reads it too


def test_the_safetensors_librarys_bytes_are_read_too():
    assert_same(decode_buffer(bytearray(encode_weights(WEIGHTS))), WEIGHTS)


def test_other_dtypes_take_the_librarys_path_both_ways():
    weights = {**WEIGHTS, "complex": torch.randn(3, dtype=torch.complex64)}
    _, back = received(weights, 16)
    assert_same(back, weights)


def test_received_tensors_are_views_of_the_buffer_aligned_and_writable():
    total, pieces = encode_chunks(WEIGHTS)
    assembler = Assembler(total, limit=total)
    for piece in pieces:
        assembler.add(piece)
    back = assembler.weights()
    base = memoryview(assembler.buffer)
    for key in ("layer.weight", "layer.bias", "steps"):
        assert back[key].data_ptr() % back[key].element_size() == 0
    back["layer.weight"][0, 0] = 42.0  # writable (no copy was made)
    assert 42.0 in torch.frombuffer(base, dtype=torch.float32).tolist()


def test_sizes_over_the_declared_or_the_limit_are_refused():
    with pytest.raises(WireError, match="over the limit"):
        Assembler(101, limit=100)
    assembler = Assembler(4, limit=100)
    assembler.add(b"ab")
    with pytest.raises(WireError, match="more bytes than the 4 declared"):
        assembler.add(b"abc")


def payload_with(header: object, data: bytes = b"", length: int | None = None) -> bytearray:
    text = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(text) if length is None else length) + text + data)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(("payload", "message"), [
    (bytearray(b""), "shorter than its header"),
    (bytearray(b"\x10\x00\x00\x00"), "shorter than its header"),
    (payload_with({}, length=1 << 40), "does not fit"),
    (bytearray(struct.pack("<Q", 4) + b"\xff\xfe{}"), "not JSON"),
    (payload_with([1, 2]), "not a JSON object"),
    (payload_with({"__metadata__": [1]}), "__metadata__ is not an object"),
    (payload_with({"w": "F32"}), "bad entry"),
    (payload_with({"w": {**F32, "extra": 1}}, bytes(8)), "bad entry"),
    (payload_with({"w": {**F32, "dtype": 7}}, bytes(8)), "bad dtype"),
    (payload_with({"w": {**F32, "shape": [-2]}}, bytes(8)), "bad shape or offsets"),
    (payload_with({"w": {**F32, "shape": [True]}}, bytes(8)), "bad shape or offsets"),
    (payload_with({"w": {**F32, "shape": 2}}, bytes(8)), "bad shape or offsets"),
    (payload_with({"w": {**F32, "data_offsets": [0, 16]}}, bytes(8)), "bad shape or offsets"),
    (payload_with({"w": {**F32, "data_offsets": [8, 0]}}, bytes(8)), "bad shape or offsets"),
    (payload_with({"w": {**F32, "data_offsets": [0, 4]}}, bytes(8)), "4 bytes for shape"),
    (payload_with({"w": F32}, bytes(12)), "4 bytes belong to no tensor"),
    (payload_with({"w": F32, "v": F32}, bytes(16)), "does not follow"),
    (payload_with({"w": F32, "v": {**F32, "data_offsets": [12, 20]}}, bytes(20)), "does not follow"),
    (payload_with({"w": {**F32, "dtype": "X99"}}, bytes(8)), "malformed tensor payload"),
])
def test_malformed_payloads_are_wire_errors(payload, message):
    with pytest.raises(WireError, match=message):
        decode_buffer(payload)


def test_corrupted_payloads_never_crash():
    """Random byte flips and truncations: the result is the right weights, other valid
    weights, or a WireError; nothing else."""
    _, pieces = encode_chunks(WEIGHTS)
    clean = b"".join(pieces)
    rng = random.Random(0)
    for _ in range(2000):
        data = bytearray(clean)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(min(len(data), 400))] = rng.randrange(256)
        try:
            back = decode_buffer(data)
        except WireError:
            continue
        assert all(isinstance(v, torch.Tensor) for v in back.values())
