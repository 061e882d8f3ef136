"""The codec: tensors and JSON messages round-trip; malformed bytes are clear errors."""

from __future__ import annotations

import pytest
import torch

from oiafed.runtime.codec import (
    WireError,
    decode_json,
    decode_weights,
    encode_json,
    encode_weights,
)


def test_weights_round_trip_bit_for_bit():
    weights = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 1, 3, dtype=torch.float64), "d": torch.tensor(1.5)}
    back = decode_weights(encode_weights(weights))
    assert back.keys() == weights.keys()
    for key, value in weights.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)


@pytest.mark.parametrize("payload", [b"", b"garbage", b"\xff" * 64,
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}.....",
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00{}"[:12]])
def test_malformed_tensor_payloads_are_wire_errors(payload):
    with pytest.raises(WireError, match="malformed tensor payload"):
        decode_weights(payload)


def test_truncated_payload_is_a_wire_error():
    data = encode_weights({"w": torch.randn(100)})
    with pytest.raises(WireError):
        decode_weights(data[:-10])


def test_messages_must_be_json_objects():
    assert decode_json(encode_json({"op": "train", "round": 3})) == {"op": "train", "round": 3}
    for bad in (b"[1, 2]", b"\xff\xfe", b"{'python': 'literal'}"):
        with pytest.raises(WireError):
            decode_json(bad)
