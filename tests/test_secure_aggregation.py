"""Secure aggregation (Bonawitz et al., CCS 2017): Shamir, the protocol's four steps with
dropouts, tampered and replayed messages, the fixed-point sum against plain FedAvg, config
refusals, and a loopback gRPC run against plain gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Collection
from dataclasses import replace
from itertools import combinations

import numpy as np
import pytest
import torch

import oiafed
from oiafed.config import load_config
from oiafed.core.learner import EVALUATE, TASK
from oiafed.core.trainer import Trainer
from oiafed.core.types import (
    ClientFailure,
    ClientTask,
    ClientUpdate,
    Outcome,
    RoundTask,
    SecureSum,
    Weights,
)
from oiafed.exceptions import ConfigError, SecureAggregationError, SecureAggregationFailed
from oiafed.privacy.central import CentralDP
from oiafed.runtime.base import RunEnd
from oiafed.runtime.envelope import decode_client, decode_round, pack_update
from oiafed.runtime.grpc.auth import ClientSecurity, ServerSecurity, client_token
from oiafed.runtime.grpc.client import FederationClient
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.runtime import GrpcRuntime
from oiafed.runtime.grpc.secure import SecureSettings
from oiafed.runtime.worker import TaskReply
from oiafed.secagg import messages as msg
from oiafed.secagg import quantize, shamir
from oiafed.secagg.crypto import unseal
from oiafed.secagg.protocol import (
    ClientRound,
    PublicKeys,
    RoundParams,
    ServerRound,
    associated_data,
)
from oiafed.secagg.updates import HEADER, METRIC_BITS, client_input, secure_sum, vector_length
from support import tiny_config

IDS = [f"client_{i}" for i in range(5)]
ENCODING = msg.Encoding(bound=4.0, precision_bits=24, weighted=True)


def share_round(params: RoundParams, ids: list[str], share_drop: Collection[str] = ()
                ) -> tuple[ServerRound, dict[str, ClientRound]]:
    """AdvertiseKeys and ShareKeys in process, through the wire forms; the clients in
    ``share_drop`` vanish after advertising."""
    clients = {cid: ClientRound(cid, params.round_num) for cid in ids}
    server = ServerRound(params, ids)
    for cid in ids:
        server.advertised(cid, msg.decode_advertise(msg.encode_advertise(clients[cid].advertise())))
    wire_keys = msg.encode_keys(params, ENCODING, server.key_list())
    for cid in ids:
        if cid not in share_drop:
            got_params, _, keys = msg.decode_keys(wire_keys)
            server.shared(cid, clients[cid].share_keys(got_params, keys))
    return server, clients


def run_protocol(inputs: dict[str, np.ndarray], threshold: int, *, share_drop: set[str] = frozenset(),
                 mask_drop: set[str] = frozenset(), unmask_drop: set[str] = frozenset(),
                 round_num: int = 3) -> tuple[ServerRound, np.ndarray]:
    """Every step in process; clients in ``share_drop`` vanish after advertising, in
    ``mask_drop`` after sharing keys, in ``unmask_drop`` after sending their masked input."""
    length = len(next(iter(inputs.values())))
    params = RoundParams(os.urandom(16), round_num, threshold, length)
    server, clients = share_round(params, sorted(inputs), share_drop)
    for cid in sorted(server.ciphertexts):
        if cid not in mask_drop:
            y = clients[cid].masked_input(server.routed(cid), inputs[cid])
            server.masked_input(cid, y)
    survivors = server.survivors()
    for cid in survivors:
        if cid not in unmask_drop:
            server.unmasked(cid, msg.decode_unmask(msg.encode_unmask(clients[cid].unmask(survivors))))
    return server, server.total()


def random_inputs(length: int = 257) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(7)
    return {cid: gen.integers(0, 2**64, length, dtype=np.uint64) for cid in IDS}


# -- Shamir ------------------------------------------------------------------------------------


def test_shamir_reconstructs_from_any_threshold_subset_of_a_known_polynomial():
    secret = 123456789 * 2**200 + 17
    # shares of f(x) = secret + 5x + 11x^2, computed here independently of split
    shares = {x: (secret + 5 * x + 11 * x * x) % shamir.PRIME for x in range(1, 6)}
    for subset in combinations(shares, 3):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 3) == secret
    made = shamir.split(secret, 3, range(1, 6))
    for subset in combinations(made, 3):
        assert shamir.reconstruct({x: made[x] for x in subset}, 3) == secret
    with pytest.raises(SecureAggregationError, match="fewer than the threshold"):
        shamir.reconstruct({x: made[x] for x in (1, 2)}, 3)
    # two shares interpolate a line, not the degree-2 polynomial: another value at 0
    assert shamir.reconstruct({x: made[x] for x in (1, 2)}, 2) != secret


# -- the protocol --------------------------------------------------------------------------------


def test_the_server_holds_uniform_looking_masked_vectors_and_unmasks_the_exact_sum():
    inputs = random_inputs()
    inputs["client_0"] = np.zeros(257, dtype=np.uint64)  # an input with no randomness of its own
    server, total = run_protocol(inputs, threshold=3)
    assert np.array_equal(total, sum(inputs.values()))  # mod 2**64
    held = server.masked["client_0"]
    assert not np.any(held == inputs["client_0"])
    bits = np.unpackbits(held.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.02  # 16448 bits: 6 standard deviations is ~0.023
    top_bytes = np.bincount((held >> np.uint64(60)).astype(np.int64), minlength=16)
    assert top_bytes.max() < 40  # 257 draws over 16 values: about 16 each


def test_clients_that_drop_after_sharing_or_after_masking_are_recovered():
    inputs = random_inputs()
    server, total = run_protocol(inputs, threshold=2, share_drop={"client_4"},
                                 mask_drop={"client_1"}, unmask_drop={"client_2"})
    survivors = server.survivors()
    assert survivors == ["client_0", "client_2", "client_3"]
    # client_1's pairwise masks were removed with its Shamir-rebuilt mask key
    assert np.array_equal(total, sum(inputs[c] for c in survivors))


def test_below_the_threshold_the_round_fails_naming_the_setting():
    with pytest.raises(SecureAggregationFailed,
                       match=r"threshold=4 clients, only 3 sent masked inputs.*client_0, client_1"):
        run_protocol(random_inputs(), threshold=4, mask_drop={"client_0", "client_1"})
    with pytest.raises(SecureAggregationFailed, match="only 3 sent unmasking shares"):
        run_protocol(random_inputs(), threshold=4, unmask_drop={"client_3", "client_4"})


def test_a_tampered_share_fails_authentication_at_its_recipient():
    params = RoundParams(os.urandom(16), 1, 2, 8)
    a, b = ClientRound("client_a", 1), ClientRound("client_b", 1)
    keys = {"client_a": a.advertise(), "client_b": b.advertise()}
    to_b = a.share_keys(params, keys)["client_b"]
    b.share_keys(params, keys)
    tampered = bytearray(to_b)
    tampered[20] ^= 1
    with pytest.raises(SecureAggregationError, match="failed authentication"):
        b.masked_input({"client_a": bytes(tampered)}, np.zeros(8, dtype=np.uint64))


def test_a_share_replayed_into_another_round_session_or_pair_fails_authentication():
    trio = ["client_a", "client_b", "client_c"]
    params = RoundParams(os.urandom(16), 3, 2, 4)
    server, clients = share_round(params, trio)
    to_b = server.ciphertexts["client_a"]["client_b"]
    # the pair's real key, so that only the protocol's associated data differs below
    key = clients["client_a"]._share_key("client_b")
    assert unseal(key, to_b, associated_data(params, "client_a", "client_b"))
    for other, sender, recipient in [
            (replace(params, round_num=4), "client_a", "client_b"),  # another round
            (replace(params, session=os.urandom(16)), "client_a", "client_b"),  # another run
            (params, "client_c", "client_b"), (params, "client_a", "client_c")]:  # another pair
        with pytest.raises(SecureAggregationError, match="failed authentication"):
            unseal(key, to_b, associated_data(other, sender, recipient))
    zeros = np.zeros(4, dtype=np.uint64)
    # end to end: a's share for c, routed to b as a's, and one replayed into the next round
    moved = {**server.routed("client_b"), "client_a": server.ciphertexts["client_a"]["client_c"]}
    with pytest.raises(SecureAggregationError, match="failed authentication"):
        clients["client_b"].masked_input(moved, zeros)
    later, later_clients = share_round(replace(params, round_num=4), trio)
    replayed = {**later.routed("client_b"), "client_a": to_b}
    with pytest.raises(SecureAggregationError, match="failed authentication"):
        later_clients["client_b"].masked_input(replayed, zeros)
    assert len(clients["client_c"].masked_input(server.routed("client_c"), zeros)) == 4


def test_replayed_step_messages_and_masked_inputs_of_another_session_or_round_are_refused():
    params = RoundParams(os.urandom(16), 3, 2, 4)
    server = ServerRound(params, ["client_a", "client_b"])
    keys = ClientRound("client_a", 3).advertise()
    server.advertised("client_a", keys)
    with pytest.raises(SecureAggregationError, match="twice"):
        server.advertised("client_a", keys)
    masked = msg.encode_masked(params, "client_a", np.arange(4, dtype=np.uint64)).to_bytes()
    assert list(msg.decode_masked(masked, params, "client_a")) == [0, 1, 2, 3]
    for other, sender in [(replace(params, round_num=4), "client_a"),
                          (replace(params, session=os.urandom(16)), "client_a"),
                          (params, "client_b")]:
        with pytest.raises(SecureAggregationError, match="another session or round"):
            msg.decode_masked(masked, other, sender)
    client = ClientRound("client_a", 3)
    client.advertise()
    with pytest.raises(SecureAggregationError, match="out of order"):
        client.advertise()


def test_a_client_refuses_key_and_survivor_lists_the_protocol_forbids():
    params = RoundParams(os.urandom(16), 2, 2, 4)
    a, b, c = (ClientRound(cid, 2) for cid in ("client_a", "client_b", "client_c"))
    keys = {"client_a": a.advertise(), "client_b": b.advertise(), "client_c": c.advertise()}
    with pytest.raises(SecureAggregationError, match="does not hold this client's keys"):
        a.share_keys(params, {"client_b": keys["client_b"], "client_c": keys["client_c"]})
    to_a = b.share_keys(params, keys)["client_a"]
    c.share_keys(params, keys)
    a2 = ClientRound("client_a", 2)
    keys["client_a"] = a2.advertise()
    a2.share_keys(params, keys)
    with pytest.raises(SecureAggregationError, match="failed authentication"):
        a2.masked_input({"client_b": to_a}, np.zeros(4, dtype=np.uint64))  # for the old key
    with pytest.raises(SecureAggregationError, match="out of order"):
        c.share_keys(params, keys)
    d, e = ClientRound("client_d", 2), ClientRound("client_e", 2)
    keys = {"client_d": d.advertise(), "client_e": e.advertise()}
    keys["client_e"] = PublicKeys(keys["client_e"].cipher, keys["client_d"].mask)
    with pytest.raises(SecureAggregationError, match="the same key"):
        d.share_keys(params, keys)  # a mask key copied from another client


def masked_round(threshold: int = 2) -> tuple[ServerRound, dict[str, ClientRound],
                                              dict[str, np.ndarray]]:
    """A round of IDS up to the survivors: client_4 shared keys but never sent its masked
    input (its mask key must be rebuilt)."""
    inputs = random_inputs(16)
    server, clients = share_round(RoundParams(os.urandom(16), 3, threshold, 16), IDS)
    for cid in IDS[:4]:
        server.masked_input(cid, clients[cid].masked_input(server.routed(cid), inputs[cid]))
    server.survivors()
    return server, clients, inputs


def test_the_server_refuses_late_inputs_and_unmasking_answers_of_the_wrong_kind_or_cover():
    server, clients, inputs = masked_round()
    late = clients["client_4"].masked_input(server.routed("client_4"), inputs["client_4"])
    with pytest.raises(SecureAggregationError, match="too late"):
        server.masked_input("client_4", late)
    survivors = server.survivors()
    assert survivors == IDS[:4]
    answer = clients["client_0"].unmask(survivors)
    assert answer["client_4"][0] == "mask_key" and answer["client_1"][0] == "seed"
    wrong_kind = {**answer, "client_4": ("seed", answer["client_4"][1])}
    with pytest.raises(SecureAggregationError, match="'seed' share for 'client_4'"):
        server.unmasked("client_0", wrong_kind)
    partial = {cid: share for cid, share in answer.items() if cid != "client_4"}
    with pytest.raises(SecureAggregationError, match="other clients than the round's members"):
        server.unmasked("client_0", partial)
    for cid in survivors:
        server.unmasked(cid, answer if cid == "client_0" else clients[cid].unmask(survivors))
    assert np.array_equal(server.total(), sum(inputs[c] for c in survivors))  # not client_4's


def test_shares_that_rebuild_no_key_fail_the_round_not_the_run():
    server, clients, _ = masked_round(threshold=4)
    survivors = server.survivors()
    for cid in survivors:
        answer = clients[cid].unmask(survivors)
        if cid == "client_1":  # a wrong share of client_4's mask key, of the right kind
            answer["client_4"] = ("mask_key", (answer["client_4"][1] + 1) % shamir.PRIME)
        server.unmasked(cid, answer)
    with pytest.raises(SecureAggregationFailed, match=r"client_4's mask_key.*inconsistent shares"):
        server.total()


def test_a_sum_that_could_have_wrapped_around_fails_the_round():
    reference: Weights = {"w": torch.zeros(2)}
    total = np.zeros(vector_length(reference), dtype=np.uint64)
    total[0] = total[1] = 2**40  # 2**40 * 4 * 2**24 > 2**63
    with pytest.raises(SecureAggregationFailed, match="could wrap around"):
        secure_sum(total, reference, ENCODING, IDS)
    total[0] = total[1] = 0
    with pytest.raises(SecureAggregationFailed, match="weight 0"):
        secure_sum(total, reference, ENCODING, IDS)


# -- fixed point against FedAvg ----------------------------------------------------------------


def test_the_unmasked_mean_is_fedavg_within_the_quantization_error():
    gen = torch.Generator().manual_seed(3)
    reference: Weights = {"w": torch.randn(7, 3, generator=gen), "b": torch.randn(5, generator=gen),
                          "steps": torch.tensor(4)}
    counts = [3, 50, 1, 17, 9]
    updates = [ClientUpdate(cid, n, {"accuracy": 0.1 * i, "loss": 2.0 - 0.3 * i},
                            {"w": reference["w"] + 0.5 * torch.randn(7, 3, generator=gen),
                             "b": reference["b"] - 0.2 * i, "steps": torch.tensor(9)})
               for i, (cid, n) in enumerate(zip(IDS, counts, strict=True))]
    inputs = {u.client_id: client_input(u, reference, ENCODING) for u in updates}
    assert len(inputs["client_0"]) == vector_length(reference) == 4 + 21 + 5
    _, total = run_protocol(inputs, threshold=3)
    result = secure_sum(total, reference, ENCODING, IDS)
    for key in ("w", "b"):  # the float64 mean update, exact to the documented bound
        deltas = [u.weights[key].double() - reference[key].double() for u in updates]
        exact = sum(n * d for n, d in zip(counts, deltas, strict=True)) / sum(counts)
        mean = result.update_sum[key] / sum(counts)
        assert mean.dtype == torch.float64
        assert (mean - exact).abs().max() <= quantize.max_error(24)
        assert (mean - exact).abs().max() > 0  # rounded, so the bound is tested
        # the weights: global plus that mean in float64, cast to the model's dtype at the end
        assert torch.equal(result.weights[key], (reference[key].double() + mean).float())
    assert result.weights["steps"] == 4  # integer buffers keep the global values
    total_n = sum(counts)
    for name in ("accuracy", "loss"):
        expected = sum(u.metrics[name] * u.num_samples for u in updates) / total_n
        assert result.metrics[name] == pytest.approx(expected, abs=quantize.max_error(METRIC_BITS))
    assert result.num_samples == total_n and result.members == tuple(IDS)


def test_with_central_dp_the_clients_clip_and_the_server_noises_the_same_sum():
    gen = torch.Generator().manual_seed(5)
    reference: Weights = {"w": torch.randn(6, 4, generator=gen, dtype=torch.float64),
                          "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    scales = [0.05, 0.3, 2.0, 0.01, 1.2]  # some updates longer than C, some shorter
    updates = [ClientUpdate(cid, 7 * (i + 1), {"accuracy": 0.5, "loss": 1.0},
                            {k: v + scale * torch.randn(v.shape, generator=gen)
                             for k, v in reference.items()})
               for i, (cid, scale) in enumerate(zip(IDS, scales, strict=True))]
    encoding = msg.Encoding(bound=4.0, precision_bits=24, weighted=False, clip_norm=1.0)
    inputs = {u.client_id: client_input(u, reference, encoding) for u in updates}
    d = 6 * 4 + 3
    for x in inputs.values():  # the sensitivity: each fixed-point update within C
        assert np.linalg.norm(quantize.decode(x[HEADER:], 1, 24)) <= 1.0
    _, total = run_protocol(inputs, threshold=3)
    secure = secure_sum(total, reference, encoding, IDS)
    results = []
    for given in ([secure], updates):  # clipped by the clients; by the server (in clear)
        dp = CentralDP(noise_multiplier=0.5, clip_norm=1.0)
        dp.bind(num_clients=20, num_sampled=5, seed=0)
        (average,) = dp.prepare(1, given, reference)
        results.append(average.weights)
    # per coordinate and client: rounding 2**-25, and clipping to C - sqrt(d) 2**-25
    # instead of C moves a coordinate by at most sqrt(d) 2**-25; the 5 clients' sum is / m = 5
    bound = (1 + math.sqrt(d)) * quantize.max_error(24)
    for key in reference:  # float64 models: no cast to hide or add an error
        assert (results[0][key] - results[1][key]).abs().max() <= bound, key
        assert not torch.allclose(results[0][key], reference[key], atol=1e-3)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(("sections", "says"), [
    ({"runtime": {"mode": "parallel", "secure_aggregation": {}}}, "grpc only"),
    ({"runtime": {"mode": "grpc", "secure_aggregation": {}}, "aggregator": {"type": "median"}},
     "'median' cannot use"),
    ({"runtime": {"mode": "grpc", "secure_aggregation": {}}, "aggregator": {"type": "scaffold"}},
     "'scaffold' cannot use"),
    ({"runtime": {"mode": "grpc", "secure_aggregation": {}},
      "privacy": {"type": "central", "args": {"adaptive": True, "secure_rng": False}}},
     "adaptive must be false"),
    ({"runtime": {"mode": "grpc", "secure_aggregation": {}},
      "data": {"type": "digits", "num_clients": 4, "local_test_fraction": 0.2}},
     "^data.local_test_fraction: personal evaluation .* in clear"),
    ({"runtime": {"mode": "grpc", "secure_aggregation": {"threshold": 4}},
      "trainer": {"args": {"clients_per_round": 3}}},
     r"^runtime.secure_aggregation.threshold: 4 is more than the 3 clients sampled"),
    ({"runtime": {"mode": "grpc", "secure_aggregation": {"threshold": 3}},
      "trainer": {"args": {"fraction": 0.5}}}, r"threshold: 3 is more than the 2 clients"),
    ({"runtime": {"mode": "grpc", "secure_aggregation": {"bound": 2.0**20, "precision_bits": 41}}},
     r"^runtime.secure_aggregation.precision_bits: 4 clients \* bound 1.04858e\+06 \* 2\*\*41"),
])
def test_configs_secure_aggregation_cannot_serve_are_refused_naming_the_section(sections, says):
    with pytest.raises(ConfigError, match=says) as caught:
        load_config(tiny_config(**sections))
    assert "runtime.secure_aggregation" in str(caught.value)


def test_the_runtime_refuses_a_personal_evaluation_under_secure_aggregation():
    runtime = GrpcRuntime("127.0.0.1:0", ServerSecurity("a-secret-for-the-tests-of-this-file"))
    runtime.secure = SecureSettings(None, ENCODING, None)
    task = RoundTask(1, {"w": torch.zeros(2)}, extra_values={TASK: EVALUATE})
    with pytest.raises(ConfigError, match=r"data\.local_test_fraction"):
        asyncio.run(runtime.train(task, [ClientTask("client_0", 0)], None))


def test_a_client_refuses_keys_whose_fixed_point_settings_could_wrap_around():
    params = RoundParams(os.urandom(16), 1, 2, 4)
    keys = {"client_a": ClientRound("client_a", 1).advertise()}
    for bound, bits, ok in [(4.0, 48, True), (4.0, 49, False), (4.0, 0, False),
                            (2.0**20, 42, True), (2.0**20, 43, False)]:
        wire = msg.encode_keys(params, msg.Encoding(bound, bits, weighted=True), keys)
        if ok:
            assert msg.decode_keys(wire)[1].precision_bits == bits
        else:
            with pytest.raises(SecureAggregationError, match=r"precision_bits must be in 1\.\.48"):
                msg.decode_keys(wire)


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("privacy", [None, {"type": "central", "args": {
    "noise_multiplier": 0.3, "clip_norm": 0.5, "secure_rng": False}}])
def test_a_loopback_grpc_run_with_secure_aggregation_matches_plain_grpc(tmp_path, privacy):
    """FedAvg (sample-weighted), and central DP (the clients clip, the server noises)."""
    base = tiny_config(trainer={"args": {"rounds": 2}}, privacy=privacy)
    runtime = {"mode": "grpc", "checkpoint_interval": 0}
    plain = oiafed.run({**base, "runtime": runtime}, run_dir=tmp_path / "plain")
    secure = oiafed.run({**base, "runtime": {**runtime, "secure_aggregation": {"threshold": 3}}},
                        run_dir=tmp_path / "secure")
    for a, b in zip(plain.history, secure.history, strict=True):
        assert a["num_clients"] == b["num_clients"] == 4
        assert a.get("num_samples") == b.get("num_samples")  # not reported under central DP
        if privacy is None:  # central DP releases no training metrics of the clients
            assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        # weights within 3e-8 of each other: at most a borderline test image may flip
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1 / 360 + 1e-9)
    for key, value in plain.weights.items():
        assert torch.allclose(secure.weights[key], value, atol=1e-6, rtol=0), key
    rows = [json.loads(line) for line in
            (tmp_path / "secure" / "clients.jsonl").read_text().splitlines()]
    # the server knows who took part, not what any client sent
    assert rows[:4] == [{"round": 1, "client_id": f"client_{i}"} for i in range(4)]


# -- over gRPC, in process -------------------------------------------------------------------


class _Vanish(BaseException):
    """Ends a test client's thread as a crash would (its connection drops)."""


class DroppingClient(FederationClient):
    """A client that vanishes when the server routes it its shares (after ShareKeys): it is
    in U2 but its masked input never comes, so its pairwise masks must be rebuilt."""

    def _secure_step(self, secure, message, outbox):
        if message.step == msg.ROUTED:
            raise _Vanish
        return super()._secure_step(secure, message, outbox)


class HangingClient(FederationClient):
    """A client that stalls for 1 s before masking its input (a straggler at that step)."""

    def _secure_step(self, secure, message, outbox):
        if message.step == msg.ROUTED:
            time.sleep(1.0)
        return super()._secure_step(secure, message, outbox)


def grpc_round(threshold: int, drop: set[str], num_clients: int = 4,
               client_kind: type[FederationClient] = DroppingClient,
               step_timeout: float = 20.0) -> list[Outcome]:
    """One secure round over real gRPC: client ``i`` adds ``0.1 * (i + 1)`` to every weight."""
    ids = [f"client_{i}" for i in range(num_clients)]
    secret = "a-secret-for-the-secure-aggregation-tests"

    def execute(i: int, cid: str):
        def run(round_data: memoryview, client_data: bytes) -> TaskReply:
            task = decode_round(round_data)
            assert decode_client(client_data).client_id == cid
            weights = {k: v + 0.1 * (i + 1) for k, v in task.weights.items()}
            return TaskReply(update=pack_update(ClientUpdate(cid, 10 + i, {"accuracy": 0.5,
                                                                            "loss": 1.0}, weights)))
        return run

    async def scenario() -> list[Outcome]:
        trainer = Trainer(rounds=1)
        trainer.client_ids = ids
        runtime = GrpcRuntime("127.0.0.1:0", ServerSecurity(secret), join_timeout=30)
        runtime.secure = SecureSettings(threshold, ENCODING, step_timeout=step_timeout)
        start = asyncio.ensure_future(runtime.start(trainer.run_spec()))
        while not runtime.port:
            await asyncio.sleep(0.01)
        threads = []
        for i, cid in enumerate(ids):
            kind = client_kind if cid in drop else FederationClient
            client = kind(f"127.0.0.1:{runtime.port}", cid, execute(i, cid),
                          ClientSecurity(client_token(secret, cid)), reconnect_timeout=5)
            thread = threading.Thread(target=lambda c=client: _quiet(c.run), daemon=True)
            thread.start()
            threads.append(thread)
        await start
        try:
            return await runtime.train(RoundTask(1, {"w": torch.zeros(3, 2), "b": torch.ones(2)}),
                                       [ClientTask(cid, i) for i, cid in enumerate(ids)], None)
        finally:
            await runtime.close(RunEnd(ok=True, reason="done"))

    return asyncio.run(scenario())


def _quiet(run) -> None:
    with contextlib.suppress(BaseException):
        run()


def assert_mean(result: SecureSum, key: str, counts: dict[int, int], base: float) -> None:
    """``result``'s mean update of ``key`` is within the documented 2**-25 of the exact weighted
    mean of ``grpc_round``'s updates (client ``i`` sends ``base + 0.1 (i + 1)`` in float32)."""
    sent = {i: (torch.full((1,), base) + 0.1 * (i + 1)).double().item() - base for i in counts}
    exact = sum(sent[i] * n for i, n in counts.items()) / sum(counts.values())
    mean = result.update_sum[key] / sum(counts.values())
    assert (mean - exact).abs().max() <= quantize.max_error(24)


class DropsAfterMasking(FederationClient):
    """A client that vanishes once its masked input is in (when the survivors are named)."""

    def _secure_step(self, secure, message, outbox):
        if message.step == msg.SURVIVORS:
            raise _Vanish
        return super()._secure_step(secure, message, outbox)


@pytest.mark.timeout(60)
def test_over_grpc_a_client_that_drops_after_masking_still_counts_in_the_sum():
    outcomes = grpc_round(threshold=3, drop={"client_2"}, client_kind=DropsAfterMasking)
    assert not any(isinstance(o, ClientFailure) for o in outcomes)
    (result,) = outcomes
    assert isinstance(result, SecureSum) and result.members == tuple(IDS[:4])
    assert_mean(result, "w", {0: 10, 1: 11, 2: 12, 3: 13}, base=0.0)


@pytest.mark.timeout(60)
def test_over_grpc_a_client_that_drops_after_sharing_keys_is_recovered():
    outcomes = grpc_round(threshold=3, drop={"client_2"})
    failures = [o for o in outcomes if isinstance(o, ClientFailure)]
    assert [f.client_id for f in failures] == ["client_2"]
    (result,) = [o for o in outcomes if isinstance(o, SecureSum)]
    assert result.members == ("client_0", "client_1", "client_3")
    assert_mean(result, "w", {0: 10, 1: 11, 3: 13}, base=0.0)
    assert result.num_samples == 34


@pytest.mark.timeout(60)
def test_over_grpc_a_step_goes_on_without_a_client_that_misses_its_step_timeout():
    outcomes = grpc_round(threshold=3, drop={"client_0"}, client_kind=HangingClient,
                          step_timeout=0.3)
    failures = [o for o in outcomes if isinstance(o, ClientFailure)]
    assert [(f.client_id, f.kind) for f in failures] == [("client_0", "timeout")]
    assert "did not send its masked input in time" in failures[0].error
    (result,) = [o for o in outcomes if isinstance(o, SecureSum)]
    assert_mean(result, "b", {1: 11, 2: 12, 3: 13}, base=1.0)


@pytest.mark.timeout(60)
def test_over_grpc_too_many_dropouts_fail_the_round_clearly():
    with pytest.raises(SecureAggregationFailed, match="threshold=4"):
        grpc_round(threshold=4, drop={"client_1"})


class StaleClient(FederationClient):
    """A client that, before masking its input, sends its shares again (a replay) and a
    message of another task (stale): the server must drop both and go on."""

    def _secure_step(self, secure, message, outbox):
        if message.step == msg.ROUTED:
            for task_id, step in ((secure.task_id, msg.SHARES), (secure.task_id + 1000, msg.UNMASK)):
                outbox.put(pb.ClientMessage(secagg=pb.SecAgg(
                    task_id=task_id, round=secure.round_num, step=step, data=b"{}")))
        return super()._secure_step(secure, message, outbox)


@pytest.mark.timeout(60)
def test_over_grpc_replayed_and_stale_step_messages_are_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="oiafed.runtime.grpc.secure"):
        outcomes = grpc_round(threshold=3, drop={"client_1"}, client_kind=StaleClient)
    (result,) = outcomes
    assert isinstance(result, SecureSum) and result.members == tuple(IDS[:4])
    assert_mean(result, "w", {0: 10, 1: 11, 2: 12, 3: 13}, base=0.0)
    dropped = [r.getMessage() for r in caplog.records if "(replayed or stale)" in r.getMessage()]
    assert [m.split(" sent ")[0] for m in dropped] == ["round 1: client_1"] * 2
    assert "task 1 step 3 while step 6" in dropped[0] and "task 1001 step 6" in dropped[1]
