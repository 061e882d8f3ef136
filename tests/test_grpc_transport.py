"""The gRPC wire in one process: a real server on 127.0.0.1 and clients in threads.

Everything crosses a real socket (chunks, tokens, TLS handshakes); only the training is a stub,
so these tests are fast. Real processes: ``test_grpc_deploy.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import socket
import struct
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from oiafed import Callback, CallbackManager, ClientUpdate, Trainer
from oiafed.core.types import ClientFailure, ClientTask, Outcome, RoundTask, Weights
from oiafed.exceptions import DeploymentError, InputError, RoundFailed
from oiafed.runtime.base import RunEnd
from oiafed.runtime.codec import encode_weights
from oiafed.runtime.envelope import PROTOCOL, decode_client, decode_round, pack_update
from oiafed.runtime.grpc import ClientSecurity, GrpcRuntime, ServerSecurity
from oiafed.runtime.grpc.auth import client_token, read_secret, read_token
from oiafed.runtime.grpc.client import (
    FederationClient,
    Finished,
    RefusedError,
)
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.proto import oiafed_pb2_grpc as pb_grpc
from oiafed.runtime.grpc.wire import parse_address
from oiafed.runtime.worker import TaskReply

pytestmark = pytest.mark.timeout(120)

TOKEN = "a-test-secret-that-every-client-token-derives-from"
"""The server's secret: a client's own token is ``client_token(TOKEN, its id)``."""
WEIGHTS = {"w": torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),
           "b": torch.zeros(3)}


class Recorder(Callback):
    def __init__(self) -> None:
        self.joins: list[str] = []
        self.failures: list[tuple[str, str]] = []

    async def on_client_join(self, trainer, client_id, **kwargs):
        self.joins.append(client_id)

    async def on_client_failure(self, trainer, client_id, error, **kwargs):
        self.failures.append((client_id, error))


def make_trainer(num_clients: int = 2, **args: Any) -> Trainer:
    """A real Trainer (its quorum, timeout and ``accept``), bound only as far as a runtime needs."""
    trainer = Trainer(rounds=5, **args)
    trainer.client_ids = [f"client_{i}" for i in range(num_clients)]
    trainer.callbacks = CallbackManager([Recorder()])
    trainer.seen = trainer.callbacks.callbacks[0]  # the Recorder, for the assertions
    return trainer


def seed_of(client_id: str, round_num: int) -> int:
    return 1000 * round_num + int(client_id.rsplit("_", 1)[1])


STOPPED = RunEnd(ok=False, reason="the run stopped in round 0")


class Served:
    """A ``GrpcRuntime`` driven as the trainer drives it: joins reported as a round starts,
    each client's seed ``seed_of``, the deadline from ``round_timeout``."""

    def __init__(self, trainer: Trainer, address: str, security: ServerSecurity | None = None,
                 **options: Any) -> None:
        self.trainer = trainer
        self.runtime = GrpcRuntime(address, security or ServerSecurity(TOKEN), **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)

    async def start(self) -> None:
        await self.runtime.start(self.trainer.run_spec())

    async def train(self, round_num: int, client_ids: list[str], weights: Weights,
                    config: dict[str, Any]) -> list[Outcome]:
        self.trainer.seen.joins += self.runtime.take_joins()
        timeout = self.trainer.round_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self.runtime.train(RoundTask(round_num, weights, config),
                                        [ClientTask(cid, seed_of(cid, round_num))
                                         for cid in client_ids], deadline)

    async def close(self, end: RunEnd = STOPPED) -> None:
        await self.runtime.close(end)


@contextlib.asynccontextmanager
async def serving(trainer: Trainer, security: ServerSecurity | None = None,
                  min_join: int = 0) -> AsyncIterator[Served]:
    runtime = Served(trainer, "127.0.0.1:0", security, min_join=min_join, join_timeout=30)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


@dataclass
class Task:
    """A task as a test client sees it."""

    round_num: int
    seed: int
    config: dict[str, Any]
    weights: Weights


def as_execute(train: Callable[[Task], ClientUpdate]) -> Callable[[memoryview, bytes], TaskReply]:
    """A worker entry point (bytes in, reply out) around a test's ``train`` function."""

    def execute(round_data: memoryview, client_data: bytes) -> TaskReply:
        try:
            task, client = decode_round(round_data), decode_client(client_data)
            update = train(Task(task.round_num, client.seed, task.config, task.weights))
            return TaskReply(update=pack_update(update))
        except Exception:
            return TaskReply(traceback=traceback.format_exc())

    return execute


def echo(client_id: str, seen: list[Task] | None = None, delta: float = 1.0,
         sleep: float = 0.0) -> Callable[[Task], ClientUpdate]:
    """A client that adds ``delta`` to every weight (and records the tasks it got)."""

    def train(task: Task) -> ClientUpdate:
        if seen is not None:
            seen.append(task)
        time.sleep(sleep)
        return ClientUpdate(client_id, 10 + task.round_num,
                            {"accuracy": 0.5, "loss": 1.25, "round": float(task.round_num)},
                            {k: v + delta if v.is_floating_point() else v
                             for k, v in task.weights.items()})

    return train


class ClientThread:
    """A ``FederationClient`` running in a thread; ``result``/``error`` when it ends."""

    def __init__(self, port: int, client_id: str, train: Callable[[Task], ClientUpdate],
                 security: ClientSecurity | None = None, reconnect_timeout: float = 10.0,
                 **options: Any) -> None:
        self.client = FederationClient(f"127.0.0.1:{port}", client_id, as_execute(train),
                                       security or ClientSecurity(client_token(TOKEN, client_id)),
                                       reconnect_timeout=reconnect_timeout, **options)
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.client.run()
        except BaseException as exc:
            self.error = exc

    async def ended(self, timeout: float = 20.0) -> None:
        await asyncio.to_thread(self.thread.join, timeout)
        assert not self.thread.is_alive(), "the client did not end"


async def joined(runtime: GrpcRuntime, *client_ids: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not set(client_ids) <= set(runtime.sessions):
        assert time.monotonic() < deadline, f"never joined: {client_ids}, have {runtime.sessions}"
        await asyncio.sleep(0.02)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- a whole round trip ---------------------------------------------------------------------------


def test_weights_larger_than_the_message_limit_arrive_bit_for_bit_and_back():
    weights = {"big": torch.randn(3_000_000),            # 12 MB: three times gRPC's message limit
               "odd": torch.randn(7, 1, 3, dtype=torch.float64),
               "steps": torch.arange(5, dtype=torch.int64), "scalar": torch.tensor(2.5)}
    seen: list[Task] = []
    trainer = make_trainer(1)

    async def scenario():
        async with serving(trainer) as runtime:
            client = ClientThread(runtime.port, "client_0", echo("client_0", seen, delta=0.5))
            await joined(runtime, "client_0")
            outcomes = await runtime.train(3, ["client_0"], weights, {"lr": 0.125, "tag": "x"})
        await client.ended()
        return outcomes, client

    outcomes, client = run(scenario())
    (update,) = outcomes
    assert isinstance(update, ClientUpdate) and update.client_id == "client_0"
    assert update.num_samples == 13
    assert update.metrics == {"accuracy": 0.5, "loss": 1.25, "round": 3.0}
    for key, value in weights.items():
        expected = value + 0.5 if value.is_floating_point() else value
        assert update.weights[key].dtype == value.dtype and torch.equal(update.weights[key], expected)
    (task,) = seen
    assert (task.round_num, task.seed, task.config) == (3, 3000, {"lr": 0.125, "tag": "x"})
    assert torch.equal(task.weights["big"], weights["big"])
    # The server said the run is over (not completed: this trainer ran no round of its own).
    assert client.error is None and client.result == Finished(False, "the run stopped in round 0")
    assert trainer.seen.joins == ["client_0"]  # reported as the round started


def test_extras_of_any_size_travel_both_ways_beside_small_weights():
    """A small round with a large per-client part (extras over the message limit), and an
    update carrying large extras back: every tensor arrives bit for bit."""
    big = torch.randn(1_500_000, generator=torch.Generator().manual_seed(3))  # 6 MB
    trainer = make_trainer(1)

    def execute(round_data: memoryview, client_data: bytes) -> TaskReply:
        task, client = decode_round(round_data), decode_client(client_data)
        return TaskReply(update=pack_update(ClientUpdate(
            client.client_id, 3, {"accuracy": 1.0, "loss": 0.0}, task.weights,
            {"echo": client.extra_tensors["c_i"] * 2}, {"seed": client.seed})))

    async def scenario():
        async with serving(trainer) as runtime:
            client = FederationClient(f"127.0.0.1:{runtime.port}", "client_0", execute,
                                      ClientSecurity(client_token(TOKEN, "client_0")),
                                      reconnect_timeout=10.0)
            thread = threading.Thread(target=client.run, daemon=True)
            thread.start()
            await joined(runtime, "client_0")
            outcomes = await runtime.runtime.train(
                RoundTask(1, WEIGHTS, {"lr": 0.1}),
                [ClientTask("client_0", 77, {"c_i": big}, {"note": "x"})], None)
        await asyncio.to_thread(thread.join, 20)
        return outcomes

    (update,) = run(scenario())
    assert isinstance(update, ClientUpdate), update
    assert torch.equal(update.extra_tensors["echo"], big * 2)
    assert update.extra_values == {"seed": 77}
    assert all(torch.equal(update.weights[k], v) for k, v in WEIGHTS.items())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_start_waits_for_min_join_and_join_hooks_fire_in_the_trainer_flow():
    trainer = make_trainer(3)
    port = free_port()

    async def scenario():
        runtime = Served(trainer, f"127.0.0.1:{port}", ServerSecurity(TOKEN), min_join=3,
                              join_timeout=60)
        starting = asyncio.ensure_future(runtime.start())
        await asyncio.sleep(0.3)
        assert not starting.done()  # nobody joined yet
        clients = [ClientThread(port, f"client_{i}", echo(f"client_{i}")) for i in range(3)]
        await starting
        assert trainer.seen.joins == []  # not while the trainer is busy elsewhere
        outcomes = await runtime.train(1, ["client_2", "client_0"], WEIGHTS, {})
        await runtime.close()
        for client in clients:
            await client.ended()
        return outcomes

    outcomes = run(scenario())
    assert [o.client_id for o in outcomes] == ["client_2", "client_0"]
    assert sorted(trainer.seen.joins) == ["client_0", "client_1", "client_2"]


# -- security -------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["not-the-token", None])
def test_a_wrong_or_missing_token_is_refused_and_never_joins(token, caplog):
    trainer = make_trainer(1)
    caplog.set_level(logging.WARNING, "oiafed.runtime.grpc")

    async def scenario():
        async with serving(trainer) as runtime:
            client = ClientThread(runtime.port, "client_0", echo("client_0"),
                                  security=ClientSecurity(token))
            await client.ended()
            outcomes = await runtime.train(1, ["client_0"], WEIGHTS, {})
            return client, outcomes, dict(runtime.sessions)

    client, outcomes, sessions = run(scenario())
    assert isinstance(client.error, RefusedError)
    assert "missing or wrong token" in str(client.error) and "UNAUTHENTICATED" in str(client.error)
    assert client.client.connections == 0 and sessions == {}
    assert outcomes == [ClientFailure("client_0", "not connected", "disconnected")]
    assert trainer.seen.joins == []
    assert "refused a connection from ipv4:127.0.0.1" in caplog.text


def test_a_client_of_another_wire_protocol_is_refused_saying_so(monkeypatch):
    import oiafed.runtime.grpc.client as client_module

    monkeypatch.setattr(client_module, "PROTOCOL", PROTOCOL - 1)  # an older oiafed's client
    trainer = make_trainer(1)

    async def scenario():
        async with serving(trainer) as runtime:
            old = ClientThread(runtime.port, "client_0", echo("client_0"))
            await old.ended()
            return old, dict(runtime.sessions)

    old, sessions = run(scenario())
    assert isinstance(old.error, RefusedError) and sessions == {}
    assert f"speaks wire protocol {PROTOCOL - 1}, the server {PROTOCOL}" in str(old.error)
    assert "run the same oiafed version on both" in str(old.error)


def test_unknown_client_ids_and_other_models_are_refused():
    trainer = make_trainer(2)

    async def scenario():
        async with serving(trainer) as runtime:
            stranger = ClientThread(runtime.port, "client_7", echo("client_7"))
            await stranger.ended()
            return stranger

    stranger = run(scenario())
    assert isinstance(stranger.error, RefusedError)
    assert "unknown client id 'client_7': this federation has client_0 .. client_1" in str(
        stranger.error)

    import oiafed

    config = oiafed.load_config({"model": {"type": "logreg"}})
    trainer = make_trainer(1)
    trainer.config = config

    async def other_model():
        async with serving(trainer) as runtime:
            client = ClientThread(runtime.port, "client_0", echo("client_0"))
            client.client.digest = "0" * 64
            await client.ended()
            return client

    client = run(other_model())
    assert isinstance(client.error, RefusedError)
    assert "model section differs" in str(client.error)


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OIAFED_TOKEN", raising=False)
    monkeypatch.delenv("OIAFED_SECRET", raising=False)
    with pytest.raises(InputError, match=r"OIAFED_TOKEN or a file given with --token-file"):
        read_token()
    with pytest.raises(InputError, match=r"no secret: .*OIAFED_SECRET or a file given with "
                                         r"--secret-file"):
        ServerSecurity.from_options()
    monkeypatch.setenv("OIAFED_SECRET", f" {TOKEN} \n")
    assert read_secret() == TOKEN and ServerSecurity.from_options().secret == TOKEN
    (tmp_path / "short").write_text("a-secret-of-31-characters-only.")
    with pytest.raises(InputError, match="the secret has 31 characters, fewer than 32"):
        ServerSecurity.from_options(secret_file=tmp_path / "short")
    monkeypatch.setenv("OIAFED_TOKEN", " from-env \n")
    assert read_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(tmp_path / "token") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InputError, match="is empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(InputError, match="cannot read the token file"):
        read_token(tmp_path / "missing")
    assert ServerSecurity.from_options(no_token=True).secret is None
    with pytest.raises(InputError, match="--tls-cert and --tls-key go together"):
        ServerSecurity.from_options(tls_cert="x.pem")
    with pytest.raises(InputError, match="HOST:PORT"):
        parse_address("localhost")


def make_certificates(folder: Path, clients: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate (``client``: CN
    and DNS SAN client_0), and an unrelated CA, as PEM files in ``folder``; ``clients``: more
    client certificates, by label: their common name then DNS SANs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def builder(subject: str, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1)))

    def authority(label: str) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(label, name(label), key)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(label: str, ca: tuple[Any, x509.Certificate], usage: Any,
             sans: list[x509.GeneralName]) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(label, ca[1].subject, key)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca[0], hashes.SHA256()))
        return key, cert

    ca = authority("oiafed test CA")
    pairs = {
        "ca": ca,
        "other_ca": authority("some other CA"),
        "server": leaf("oiafed server", ca, ExtendedKeyUsageOID.SERVER_AUTH,
                       [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
    }
    for label, (common_name, *sans) in {"client": ["client_0", "client_0"], **(clients or {})}.items():
        pairs[label] = leaf(common_name, ca, ExtendedKeyUsageOID.CLIENT_AUTH,
                            [x509.DNSName(san) for san in sans])
    files = {}
    for label, (key, cert) in pairs.items():
        files[f"{label}.pem"] = folder / f"{label}.pem"
        files[f"{label}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{label}.key"] = folder / f"{label}.key"
        files[f"{label}.key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return files


@pytest.mark.slow
def test_tls_and_mutual_tls(tmp_path):
    certs = make_certificates(tmp_path)
    trainer = make_trainer(1)

    def tls_client(port: int, **files: Any) -> ClientThread:
        return ClientThread(port, "client_0", echo("client_0"), reconnect_timeout=2,
                            security=ClientSecurity(client_token(TOKEN, "client_0"), **files))

    async def scenario(security: ServerSecurity, attempts: dict[str, dict[str, Any]]):
        results = {}
        async with serving(trainer, security) as runtime:
            for label, files in attempts.items():
                client = tls_client(runtime.port, **files)
                if label.startswith("ok"):
                    await joined(runtime, "client_0")
                    results[label] = await runtime.train(1, ["client_0"], WEIGHTS, {})
                else:
                    await client.ended()
                    results[label] = client.error
        return results

    server_tls = ServerSecurity(TOKEN, tls_cert=certs["server.pem"], tls_key=certs["server.key"])
    results = run(scenario(server_tls, {
        "ok": {"tls_ca": certs["ca.pem"]},
        "wrong_ca": {"tls_ca": certs["other_ca.pem"]},
        "plaintext": {},
    }))
    assert isinstance(results["ok"][0], ClientUpdate)
    assert isinstance(results["wrong_ca"], RefusedError), results["wrong_ca"]
    assert "--tls-ca must be the CA that signed it" in str(results["wrong_ca"])
    assert isinstance(results["plaintext"], RefusedError), results["plaintext"]
    assert "uses TLS, but this client connects in plaintext" in str(results["plaintext"])

    mutual = ServerSecurity(TOKEN, tls_cert=certs["server.pem"], tls_key=certs["server.key"],
                            tls_client_ca=certs["ca.pem"])
    results = run(scenario(mutual, {
        "ok": {"tls_ca": certs["ca.pem"], "tls_cert": certs["client.pem"],
               "tls_key": certs["client.key"]},
        "no_client_cert": {"tls_ca": certs["ca.pem"]},
    }))
    assert isinstance(results["ok"][0], ClientUpdate)
    assert isinstance(results["no_client_cert"], RefusedError), results["no_client_cert"]
    assert "requires a client certificate (mutual TLS)" in str(results["no_client_cert"])


# -- failures -------------------------------------------------------------------------------------


def test_bad_updates_are_rejected_and_left_out_of_the_round(caplog):
    """Garbage bytes, a wrong shape and NaN weights: each is reported and left out; the good
    update is aggregated."""
    trainer = make_trainer(4)
    reference = {k: v.clone() for k, v in WEIGHTS.items()}

    def wrong_shape(task: Task) -> ClientUpdate:
        return ClientUpdate("client_1", 5, {"accuracy": 0.1, "loss": 2.0},
                            {"w": torch.zeros(3, 5), "b": torch.zeros(3)})

    def non_finite(task: Task) -> ClientUpdate:
        return ClientUpdate("client_2", 5, {"accuracy": 0.1, "loss": 2.0},
                            {"w": torch.full((5, 3), float("nan")), "b": torch.zeros(3)})

    async def scenario():
        async with serving(trainer) as runtime:
            good = ClientThread(runtime.port, "client_0", echo("client_0"))
            shapes = ClientThread(runtime.port, "client_1", wrong_shape)
            nans = ClientThread(runtime.port, "client_2", non_finite)
            rogue = asyncio.ensure_future(rogue_client(runtime.port, "client_3", b"not tensors"))
            await joined(runtime, "client_0", "client_1", "client_2", "client_3")
            outcomes = await runtime.train(1, trainer.client_ids, reference, {})
            accepted = await trainer.accept(1, outcomes, reference)
            rogue.cancel()
            with contextlib.suppress(BaseException):
                await rogue
        for client in (good, shapes, nans):
            await client.ended()
        return outcomes, accepted

    _, accepted = run(scenario())
    assert [u.client_id for u in accepted] == ["client_0"]
    assert torch.equal(accepted[0].weights["w"], reference["w"] + 1)
    failures = dict(trainer.seen.failures)
    assert set(failures) == {"client_1", "client_2", "client_3"}
    assert "w is (3, 5) torch.float32, expected (5, 3) torch.float32" in failures["client_1"]
    assert "w holds non-finite values" in failures["client_2"]
    assert failures["client_3"].startswith("malformed update: malformed tensor payload")
    assert "left out client_3" in caplog.text


async def rogue_client(port: int, client_id: str, payload: bytes, *, declared: int | None = None,
                       hang_up: bool = False) -> None:
    """A hand-written client (its own token) that answers its first task with ``payload``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.FederationStub(channel).Connect(
            metadata=ClientSecurity(client_token(TOKEN, client_id)).metadata(client_id))
        await call.write(pb.ClientMessage(hello=pb.Hello(client_id=client_id, protocol=PROTOCOL)))
        assert (await call.read()).WhichOneof("kind") == "welcome"
        task = (await call.read()).task
        received = len(task.data)  # small weights travel inside the task
        while received < task.size:
            received += len((await call.read()).chunk.data)
        if hang_up:
            call.cancel()
            return
        header = pb.UpdateHeader(task_id=task.task_id)
        if declared is None:  # a payload that fits one message travels inside the header
            header.size, header.data = len(payload), payload
            await call.write(pb.ClientMessage(update=header))
        else:
            header.size = declared
            await call.write(pb.ClientMessage(update=header))
            await call.write(pb.ClientMessage(chunk=pb.Chunk(task_id=task.task_id, data=payload)))
        while await call.read() is not grpc.aio.EOF:  # stay connected until the server ends
            pass


def hostile_update(entry: object) -> bytes:
    """A ~100-byte update whose one tensor entry is ``entry`` (an impossible shape, say)."""
    header = {"__metadata__": {"oiafed": json.dumps(
        {"v": PROTOCOL, "kind": "update", "client_id": "client_0", "num_samples": 1,
         "metrics": {}})}, "weights/w": entry}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("payload", [
    hostile_update({"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}),
    hostile_update({"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}),
    struct.pack("<Q", 10_000) + b"[" * 10_000,  # a header of 10,000 nested JSON lists
], ids=["shape-10e30", "shape-2e62", "nested-json"])
def test_a_hostile_update_header_fails_its_client_at_once(payload):
    """Issue 14's attack: an update that cannot be decoded ends that client's part in the
    round at once (a client failure), never the round or the server."""
    trainer = make_trainer(2)

    async def scenario():
        async with serving(trainer) as runtime:
            good = ClientThread(runtime.port, "client_1", echo("client_1"))
            rogue = asyncio.ensure_future(rogue_client(runtime.port, "client_0", payload))
            await joined(runtime, "client_0", "client_1")
            started = time.monotonic()
            outcomes = await runtime.train(1, trainer.client_ids, WEIGHTS, {})
            elapsed = time.monotonic() - started
            rogue.cancel()
            with contextlib.suppress(BaseException):
                await rogue
        await good.ended()
        return outcomes, elapsed

    outcomes, elapsed = run(scenario())
    assert elapsed < 10, "the round must not wait on an undecodable update"
    assert isinstance(outcomes[0], ClientFailure) and outcomes[0].kind == "malformed"
    assert isinstance(outcomes[1], ClientUpdate)


def test_oversized_updates_and_hang_ups_fail_at_once():
    trainer = make_trainer(2)

    async def scenario():
        async with serving(trainer) as runtime:
            huge = asyncio.ensure_future(rogue_client(runtime.port, "client_0", b"x", declared=1 << 40))
            quitter = asyncio.ensure_future(rogue_client(runtime.port, "client_1", b"", hang_up=True))
            await joined(runtime, "client_0", "client_1")
            started = time.monotonic()
            outcomes = await runtime.train(1, trainer.client_ids, WEIGHTS, {})
            elapsed = time.monotonic() - started
            for task in (huge, quitter):
                with contextlib.suppress(BaseException):
                    await task
        return outcomes, elapsed

    outcomes, elapsed = run(scenario())
    assert elapsed < 5
    assert outcomes[0].client_id == "client_0" and "over the limit" in outcomes[0].error
    assert outcomes[1] == ClientFailure("client_1", "disconnected during the round")


def test_a_hung_client_misses_the_deadline_is_busy_then_comes_back():
    trainer = make_trainer(2, round_timeout=0.5, min_clients=1)
    sleepy: list[Task] = []

    def slow_once(task: Task) -> ClientUpdate:
        sleepy.append(task)
        return echo("client_1", sleep=2.0 if task.round_num == 1 else 0.0)(task)

    async def scenario():
        async with serving(trainer) as runtime:
            clients = [ClientThread(runtime.port, "client_0", echo("client_0")),
                       ClientThread(runtime.port, "client_1", slow_once)]
            await joined(runtime, "client_0", "client_1")
            rounds = []
            for round_num in (1, 2):
                started = time.monotonic()
                rounds.append((await runtime.train(round_num, trainer.client_ids, WEIGHTS, {}),
                               time.monotonic() - started))
            await asyncio.sleep(2.0)  # client_1 finishes its round-1 task; its update is stale
            rounds.append((await runtime.train(3, trainer.client_ids, WEIGHTS, {}), 0))
        for client in clients:
            await client.ended()
        return rounds

    (first, t1), (second, t2), (third, _) = run(scenario())
    assert isinstance(first[0], ClientUpdate)
    assert first[1] == ClientFailure("client_1", "no update within round_timeout=0.5s")
    assert 0.4 < t1 < 2.0
    assert second[1] == ClientFailure("client_1", "still busy with its round-1 task")
    assert t2 < 0.4  # nobody waits on a client known to be busy
    assert all(isinstance(o, ClientUpdate) for o in third)
    assert [t.round_num for t in sleepy] == [1, 3]


def test_training_errors_fail_the_client_for_the_round_only():
    trainer = make_trainer(1)

    def flaky(task: Task) -> ClientUpdate:
        if task.round_num == 1:
            raise ValueError("out of memory, say")
        return echo("client_0")(task)

    async def scenario():
        async with serving(trainer) as runtime:
            client = ClientThread(runtime.port, "client_0", flaky)
            await joined(runtime, "client_0")
            first = await runtime.train(1, ["client_0"], WEIGHTS, {})
            second = await runtime.train(2, ["client_0"], WEIGHTS, {})
        await client.ended()
        return first, second

    first, second = run(scenario())
    (failure,) = first
    assert isinstance(failure, ClientFailure) and failure.kind == "raised"
    assert failure.error.startswith("Traceback (most recent call last)")
    assert failure.error.rstrip().endswith("ValueError: out of memory, say")
    assert isinstance(second[0], ClientUpdate)


def test_below_quorum_a_round_waits_for_clients_to_come_back_until_its_deadline():
    trainer = make_trainer(2, round_timeout=20, min_clients=2)

    async def scenario():
        async with serving(trainer) as runtime:
            first = ClientThread(runtime.port, "client_0", echo("client_0"))
            await joined(runtime, "client_0")
            late: list[ClientThread] = []
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, lambda: late.append(
                ClientThread(runtime.port, "client_1", echo("client_1"))))
            outcomes = await runtime.train(1, trainer.client_ids, WEIGHTS, {})
            await runtime.train(2, ["client_0"], WEIGHTS, {})  # fires the joins
        for client in (first, *late):
            await client.ended()
        return outcomes

    outcomes = run(scenario())
    assert all(isinstance(o, ClientUpdate) for o in outcomes)
    assert trainer.seen.joins == ["client_0", "client_1"]

    quick = make_trainer(2, round_timeout=0.3, min_clients=2)

    async def nobody_comes():
        async with serving(quick) as runtime:
            client = ClientThread(runtime.port, "client_0", echo("client_0"))
            await joined(runtime, "client_0")
            outcomes = await runtime.train(1, quick.client_ids, WEIGHTS, {})
            with pytest.raises(RoundFailed, match="fewer than min_clients=2"):
                await quick.accept(1, outcomes, WEIGHTS)
        await client.ended()
        return outcomes

    outcomes = run(nobody_comes())
    assert outcomes[1] == ClientFailure("client_1", "not connected")


def test_a_client_reconnects_to_a_restarted_server():
    trainer = make_trainer(1)

    async def scenario():
        runtime = Served(trainer, "127.0.0.1:0", ServerSecurity(TOKEN), min_join=0)
        await runtime.start()
        port = runtime.port
        client = ClientThread(port, "client_0", echo("client_0"), reconnect_timeout=30)
        await joined(runtime, "client_0")
        await runtime._server.stop(grace=None)  # the server dies without a word
        runtime = Served(trainer, f"127.0.0.1:{port}", ServerSecurity(TOKEN), min_join=1,
                              join_timeout=20)
        await runtime.start()
        outcomes = await runtime.train(1, ["client_0"], WEIGHTS, {})
        await runtime.close()
        await client.ended()
        return outcomes, client

    outcomes, client = run(scenario())
    assert isinstance(outcomes[0], ClientUpdate)
    assert client.client.connections == 2 and client.result is not None


def test_too_few_joins_within_the_join_timeout_is_a_clear_error():
    trainer = make_trainer(3)

    async def scenario():
        runtime = Served(trainer, "127.0.0.1:0", ServerSecurity(TOKEN), min_join=2,
                              join_timeout=0.3)
        await runtime.start()

    with pytest.raises(DeploymentError, match=r"only 0 of 2 client\(s\) joined within "
                                              r"runtime.join_timeout=0.3s"):
        run(scenario())


def test_a_min_join_above_the_federation_is_clamped_with_a_warning(caplog):
    trainer = make_trainer(3)

    async def scenario():
        runtime = Served(trainer, "127.0.0.1:0", ServerSecurity(TOKEN), min_join=5,
                         join_timeout=0.3)
        await runtime.start()

    with caplog.at_level(logging.WARNING, logger="oiafed"), \
            pytest.raises(DeploymentError, match=r"only 0 of 3 client\(s\) joined"):
        run(scenario())
    assert "runtime.min_join is 5 but the federation has 3 clients" in caplog.text


def test_an_update_payload_is_never_unpickled():
    """The payload decoder is safetensors: a pickle is a malformed payload, not code."""
    import pickle

    from oiafed.runtime.codec import WireError, decode_weights

    with pytest.raises(WireError):
        decode_weights(pickle.dumps({"w": torch.zeros(2)}))
    assert decode_weights(encode_weights({"w": torch.zeros(2)}))["w"].shape == (2,)
