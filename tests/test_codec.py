"""The wire codec: tensors and messages round-trip; malformed bytes are clear errors."""

from __future__ import annotations

import pytest
import torch

from oiafed import ClientUpdate
from oiafed.runtime.codec import (
    WireError,
    decode_json,
    decode_weights,
    encode_json,
    encode_weights,
    update_from_wire,
    update_header,
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


def test_update_round_trip_and_type_checks():
    update = ClientUpdate("client_3", 42, {"accuracy": 0.5, "loss": float("nan")},
                          {"w": torch.ones(2, 2)})
    header = decode_json(encode_json(update_header(update)))
    back = update_from_wire(header, encode_weights(update.weights))
    assert back.client_id == "client_3" and back.num_samples == 42
    assert back.metrics["accuracy"] == 0.5 and back.metrics["loss"] != back.metrics["loss"]
    assert torch.equal(back.weights["w"], update.weights["w"])
    for bad in ({**header, "num_samples": -1}, {**header, "num_samples": "7"},
                {**header, "client_id": 3}, {**header, "metrics": {"accuracy": "high"}},
                {k: v for k, v in header.items() if k != "metrics"}):
        with pytest.raises(WireError):
            update_from_wire(bad, encode_weights(update.weights))


def test_messages_must_be_json_objects():
    assert decode_json(encode_json({"op": "train", "round": 3})) == {"op": "train", "round": 3}
    for bad in (b"[1, 2]", b"\xff\xfe", b"{'python': 'literal'}"):
        with pytest.raises(WireError):
            decode_json(bad)
