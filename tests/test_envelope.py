"""The envelope: every message between the trainer and its clients round-trips with its extras;
a wrong kind, another protocol, stray tensors or bad fields are ``WireError``s."""

from __future__ import annotations

import json

import pytest
import torch

from oiafed import ClientUpdate
from oiafed.core.types import ClientTask, RoundTask
from oiafed.exceptions import WireError
from oiafed.runtime import envelope
from oiafed.runtime.tensors import decode_payload, encode_payload

WEIGHTS = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
           "steps": torch.tensor(4)}


def test_a_round_task_round_trips_with_its_extras():
    task = RoundTask(7, WEIGHTS, {"lr": 0.05, "tag": "x", "nan": float("nan")},
                     {"c": torch.ones(3, 2) * 0.5}, {"mu": 0.01, "names": ["a", "b"]})
    back = envelope.decode_round(envelope.encode_round(task))
    assert back.round_num == 7 and back.config["lr"] == 0.05 and back.config["tag"] == "x"
    assert back.config["nan"] != back.config["nan"]
    assert back.extra_values == {"mu": 0.01, "names": ["a", "b"]}
    assert set(back.weights) == {"w", "steps"} and torch.equal(back.weights["w"], WEIGHTS["w"])
    assert back.weights["steps"].dtype == torch.int64
    assert torch.equal(back.extra_tensors["c"], task.extra_tensors["c"])


def test_a_client_task_and_an_update_round_trip():
    client = envelope.decode_client(envelope.encode_client(
        ClientTask("client_3", 2**62, {"c_i": torch.zeros(2)}, {"steps": 12})))
    assert (client.client_id, client.seed, client.extra_values) == ("client_3", 2**62, {"steps": 12})
    assert torch.equal(client.extra_tensors["c_i"], torch.zeros(2))
    update = ClientUpdate("client_3", 42, {"accuracy": 0.5, "loss": float("inf")}, WEIGHTS,
                          {"delta_c": torch.full((3, 2), -1.0)}, {"local_steps": 30})
    back = envelope.decode_update(envelope.encode_update(update))
    assert (back.client_id, back.num_samples, back.extra_values) == ("client_3", 42,
                                                                     {"local_steps": 30})
    assert back.metrics["accuracy"] == 0.5 and back.metrics["loss"] == float("inf")
    assert torch.equal(back.weights["w"], WEIGHTS["w"])
    assert torch.equal(back.extra_tensors["delta_c"], update.extra_tensors["delta_c"])


def test_fedavg_messages_carry_no_extras():
    back = envelope.decode_update(envelope.encode_update(
        ClientUpdate("client_0", 1, {"accuracy": 1.0, "loss": 0.0}, WEIGHTS)))
    assert back.extra_tensors == {} and back.extra_values == {}


def rewrite_header(data: bytes, **changes: object) -> bytes:
    """The payload ``data`` with its JSON header changed."""
    tensors, metadata = decode_payload(data)
    header = json.loads(metadata[envelope.HEADER_KEY])
    header.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del header[key]
    return encode_payload(tensors, {envelope.HEADER_KEY: json.dumps(header)})


UPDATE = envelope.encode_update(ClientUpdate("client_1", 5, {"accuracy": 0.5, "loss": 1.0},
                                             WEIGHTS))


@pytest.mark.parametrize(("data", "message"), [
    (rewrite_header(UPDATE, v=envelope.PROTOCOL - 1),
     f"protocol {envelope.PROTOCOL - 1}; this end speaks {envelope.PROTOCOL}"),
    (rewrite_header(UPDATE, kind="round"), "expected a update message, got 'round'"),
    (rewrite_header(UPDATE, num_samples=-1), "num_samples must be an integer >= 0"),
    (rewrite_header(UPDATE, num_samples="7"), "num_samples must be an integer >= 0"),
    (rewrite_header(UPDATE, num_samples=True), "num_samples must be an integer >= 0"),
    (rewrite_header(UPDATE, client_id=3), "without a client_id"),
    (rewrite_header(UPDATE, metrics={"accuracy": "high"}), "metrics must map names to numbers"),
    (rewrite_header(UPDATE, metrics=None), "metrics must map names to numbers"),
    (rewrite_header(UPDATE, values=[1]), "values must be a JSON object"),
    (encode_payload(WEIGHTS, {envelope.HEADER_KEY: "{not json"}), "without a JSON header"),
    (encode_payload(WEIGHTS), "without a JSON header"),
    (encode_payload({"stray": torch.zeros(1)},
                    {envelope.HEADER_KEY: json.dumps({"v": envelope.PROTOCOL, "kind": "update"})}),
     "no known group"),
    (b"not a payload at all", "malformed tensor payload"),
])
def test_bad_updates_are_wire_errors_naming_the_problem(data, message):
    with pytest.raises(WireError, match=message):
        envelope.decode_update(data)


def test_values_json_cannot_carry_are_refused_when_encoding():
    with pytest.raises(WireError, match="must hold JSON values"):
        envelope.encode_round(RoundTask(1, WEIGHTS, {"bad": object()}))
    assert envelope.json_problem({"lr": 0.1, "ids": [1, 2]}) is None
    assert "'bad'" in envelope.json_problem({"lr": 0.1, "bad": {1, 2}})
