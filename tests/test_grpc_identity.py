"""Issue 14, item 2: a client proves which client it is, and no one takes over a connected one.

Each client has its own token (``client_token(secret, id)``, ``oiafed token ID``); with mutual
TLS its certificate must also name its id; a second connection for a connected id is refused,
saying why, and the first keeps its tasks. Real ``grpc.aio`` servers on 127.0.0.1, clients in
threads or hand-written; the last test runs ``oiafed server`` and ``oiafed client`` processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import grpc
import pytest
import yaml

import oiafed
from oiafed import ClientUpdate
from oiafed.cli import main
from oiafed.runtime.envelope import PROTOCOL
from oiafed.runtime.grpc import ClientSecurity, ServerSecurity
from oiafed.runtime.grpc.auth import client_token
from oiafed.runtime.grpc.client import RefusedError
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.proto import oiafed_pb2_grpc as pb_grpc
from support import tiny_config
from test_grpc_deploy import (  # noqa: F401 - hooks and processes are fixtures
    assert_same_history,
    free_port,
    hooks,
    processes,
    wait_for,
)
from test_grpc_transport import (
    TOKEN,
    WEIGHTS,
    ClientThread,
    Task,
    echo,
    joined,
    make_certificates,
    make_trainer,
    run,
    serving,
)

pytestmark = pytest.mark.timeout(120)


def own(client_id: str, **tls: Any) -> ClientSecurity:
    """``client_id``'s own token (and TLS material)."""
    return ClientSecurity(client_token(TOKEN, client_id), **tls)


async def hello(port: int, metadata: list[tuple[str, str]], client_id: str, pid: int = 0) -> Any:
    """A hand-written ``Connect`` call that says Hello as ``client_id``; the open call, or the
    ``AioRpcError`` that refused it."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = pb_grpc.FederationStub(channel).Connect(metadata=metadata)
    await call.write(pb.ClientMessage(hello=pb.Hello(client_id=client_id, protocol=PROTOCOL,
                                                     pid=pid)))
    try:
        assert (await call.read()).WhichOneof("kind") == "welcome"
    except grpc.aio.AioRpcError as exc:
        await channel.close()
        return exc
    return call


def test_tokens_are_per_client_and_printed_by_oiafed_token(tmp_path, capsys):
    (tmp_path / "secret").write_text(TOKEN + "\n")
    assert main(["token", "--secret-file", str(tmp_path / "secret"), "client_0", "client_1"]) == 0
    assert capsys.readouterr().out.split() == [client_token(TOKEN, "client_0"),
                                               client_token(TOKEN, "client_1")]
    assert client_token(TOKEN, "client_0") != client_token(TOKEN, "client_1")
    assert client_token(TOKEN, "client_0") != client_token(TOKEN + "x", "client_0")
    (tmp_path / "short").write_text("short\n")
    assert main(["token", "--secret-file", str(tmp_path / "short"), "client_0"]) == 2
    assert "fewer than 32" in capsys.readouterr().err


def test_an_impostor_with_another_clients_token_cannot_claim_its_id(caplog):
    """client_1's token opens no session as client_0, whether the call names client_0 (wrong
    token for it) or names client_1 and says Hello as client_0; client_0 then joins with its
    own token and gets the round's task."""
    caplog.set_level(logging.WARNING, "oiafed.runtime.grpc")
    trainer = make_trainer(2)
    stolen: list[Task] = []

    async def scenario():
        async with serving(trainer) as runtime:
            impostor = ClientThread(runtime.port, "client_0", echo("client_0", stolen),
                                    security=own("client_1"))
            await impostor.ended()
            forged = await hello(runtime.port, own("client_1").metadata("client_1"), "client_0")
            sessions = dict(runtime.sessions)
            real = ClientThread(runtime.port, "client_0", echo("client_0"))
            await joined(runtime, "client_0")
            outcomes = await runtime.train(1, ["client_0"], WEIGHTS, {})
        await real.ended()
        return impostor, forged, sessions, outcomes

    impostor, forged, sessions, outcomes = run(scenario())
    assert isinstance(impostor.error, RefusedError) and impostor.client.connections == 0
    assert "missing or wrong token" in str(impostor.error) and "UNAUTHENTICATED" in str(impostor.error)
    assert isinstance(forged, grpc.aio.AioRpcError)
    assert forged.code() == grpc.StatusCode.PERMISSION_DENIED
    assert forged.details() == "the Hello says 'client_0' but the token is 'client_1''s"
    assert sessions == {} and stolen == []
    assert isinstance(outcomes[0], ClientUpdate)
    assert "the Hello says 'client_0' but the token is 'client_1''s" in caplog.text  # logged


def test_a_second_connection_for_a_connected_id_is_refused_and_the_first_keeps_training(caplog):
    caplog.set_level(logging.WARNING, "oiafed.runtime.grpc")
    trainer = make_trainer(1)
    first_tasks: list[Task] = []
    second_tasks: list[Task] = []

    async def scenario():
        async with serving(trainer) as runtime:
            first = ClientThread(runtime.port, "client_0", echo("client_0", first_tasks))
            await joined(runtime, "client_0")
            started = time.monotonic()
            second = ClientThread(runtime.port, "client_0",
                                  echo("client_0", second_tasks, delta=100.0), duplicate_wait=1.0)
            await second.ended()
            waited = time.monotonic() - started
            outcomes = [await runtime.train(r, ["client_0"], WEIGHTS, {}) for r in (1, 2)]
        await first.ended()
        return first, second, waited, outcomes

    first, second, waited, outcomes = run(scenario())
    assert isinstance(second.error, RefusedError) and second.client.connections == 0
    assert "client_0 is already connected (from ipv4:127.0.0.1:" in str(second.error)
    assert "a second connection is refused (ALREADY_EXISTS)" in str(second.error)
    assert waited >= 1.0  # it kept trying for duplicate_wait, in case the first was dead
    assert second_tasks == [] and [t.round_num for t in first_tasks] == [1, 2]
    for (update,) in outcomes:
        assert isinstance(update, ClientUpdate)
        assert all(update.weights[k].equal(v + 1) for k, v in WEIGHTS.items())  # the first's
    assert first.client.connections == 1 and first.error is None
    assert "client_0 is already connected" in caplog.text


def test_a_client_restarted_while_its_dead_connection_lingers_joins_once_it_is_gone():
    """The server holds on to an earlier connection (here a hand-written one, pid 4242) until it
    ends; the restarted client keeps trying meanwhile and joins then: no takeover, no exit."""
    trainer = make_trainer(1)

    async def scenario():
        async with serving(trainer) as runtime:
            lingering = await hello(runtime.port, own("client_0").metadata("client_0"),
                                    "client_0", pid=4242)
            restarted = ClientThread(runtime.port, "client_0", echo("client_0"))
            await asyncio.sleep(1.0)
            holder = runtime.sessions["client_0"].pid
            lingering.cancel()
            deadline = time.monotonic() + 20
            while getattr(runtime.sessions.get("client_0"), "pid", 4242) == 4242:
                assert time.monotonic() < deadline, "the restarted client never joined"
                await asyncio.sleep(0.05)
            outcomes = await runtime.train(1, ["client_0"], WEIGHTS, {})
        await restarted.ended()
        return holder, outcomes, restarted

    holder, outcomes, restarted = run(scenario())
    assert holder == 4242  # the earlier connection kept its id while it lived
    assert isinstance(outcomes[0], ClientUpdate)
    assert restarted.error is None and restarted.client.connections == 1


def test_with_mutual_tls_a_certificate_for_client_1_cannot_claim_client_0(tmp_path):
    certs = make_certificates(tmp_path, {
        "c1": ["client_1", "client_1"],
        "site": ["site-b.example.org", "site-b.example.org", "client_2"],  # the id in a SAN
    })

    def tls(label: str) -> dict[str, Any]:
        return {"tls_ca": certs["ca.pem"], "tls_cert": certs[f"{label}.pem"],
                "tls_key": certs[f"{label}.key"]}

    server_tls = {"tls_cert": certs["server.pem"], "tls_key": certs["server.key"],
                  "tls_client_ca": certs["ca.pem"]}

    async def scenario(security: ServerSecurity, token: str | None):
        trainer = make_trainer(3)
        async with serving(trainer, security) as runtime:
            impostor = ClientThread(runtime.port, "client_0", echo("client_0"), reconnect_timeout=5,
                                    security=ClientSecurity(token, **tls("c1")))
            await impostor.ended()
            sessions = dict(runtime.sessions)
            honest = [ClientThread(runtime.port, cid, echo(cid), reconnect_timeout=5,
                                   security=ClientSecurity(
                                       token and client_token(TOKEN, cid), **tls(label)))
                      for cid, label in (("client_1", "c1"), ("client_2", "site"))]
            await joined(runtime, "client_1", "client_2")
            outcomes = await runtime.train(1, ["client_1", "client_2"], WEIGHTS, {})
        for client in honest:
            await client.ended()
        return impostor.error, sessions, outcomes

    # certificates alone (no tokens), then certificates and client_0's own (stolen) token
    for security, token in ((ServerSecurity(None, require_token=False, **server_tls), None),
                            (ServerSecurity(TOKEN, **server_tls), client_token(TOKEN, "client_0"))):
        error, sessions, outcomes = run(scenario(security, token))
        assert isinstance(error, RefusedError) and sessions == {}
        assert ("the client certificate names 'client_1', not 'client_0': with mutual TLS a "
                "client's certificate must name its client id") in str(error)
        assert "PERMISSION_DENIED" in str(error)
        assert all(isinstance(o, ClientUpdate) for o in outcomes)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_own_tokens_impostors_and_duplicates_with_oiafed_processes(tmp_path, capsys,
                                                                  processes):  # noqa: F811
    """``oiafed token`` hands each client its own token; ``oiafed server`` refuses an impostor
    with client_1's token claiming client_0 and a second client_0, both saying why; the run
    completes with the history of the same run on one machine."""
    secret = tmp_path / "secret"
    secret.write_text(TOKEN + "\n")
    ids = [f"client_{i}" for i in range(4)]
    assert main(["token", "--secret-file", str(secret), *ids]) == 0
    for cid, token in zip(ids, capsys.readouterr().out.split(), strict=True):
        (tmp_path / f"{cid}.token").write_text(token + "\n")
    gates = tmp_path / "gates"
    gates.mkdir()
    config = tiny_config(imports=["grpc_test_hooks"], trainer={"args": {"rounds": 3}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "callbacks": [
        {"type": "gate", "args": {"folder": str(gates), "rounds": [1]}}]}))
    address = f"127.0.0.1:{free_port()}"

    def client(name: str, cid: str, token_of: str) -> None:
        processes.start(name, "client", "config.yaml", "--server", address, "--client-id", cid,
                        "--threads", "1", "--token-file", f"{token_of}.token")

    processes.start("server", "server", "config.yaml", "--address", address, "--run-dir", "run",
                    "--secret-file", str(secret))
    for cid in ids:
        client(cid, cid, cid)
    wait_for(lambda: (gates / "waiting-1").exists(), "round 1")
    client("impostor", "client_0", "client_1")
    client("second", "client_0", "client_0")
    assert processes.wait("impostor") == 2
    wait_for(lambda: "already connected" in processes.log("second"), "the second's refusal")
    processes.started["second"].kill()
    (gates / "go-1").touch()

    assert processes.wait("server") == 0, processes.log("server")
    for cid in ids:
        assert processes.wait(cid) == 0, processes.log(cid)
        assert "the server ended the run: completed" in processes.log(cid)
    assert "missing or wrong token" in processes.log("impostor")
    assert "client_0 is already connected" in processes.log("second")
    assert "ALREADY_EXISTS" in processes.log("second")
    assert "client_0 is already connected" in processes.log("server")

    rows = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    serial = oiafed.run(config, run_dir=tmp_path / "serial")
    assert [row["num_clients"] for row in rows] == [4, 4, 4]
    assert_same_history(rows, serial.history)


def test_without_a_secret_the_server_refuses_to_start_saying_how(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OIAFED_SECRET", raising=False)
    monkeypatch.setenv("OIAFED_TOKEN", TOKEN)  # a server of an earlier version took this
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    code = main(["server", str(tmp_path / "config.yaml"), "--address", "127.0.0.1:0"])
    assert code == 2
    assert "no secret: the server needs the secret that clients' tokens derive from in " \
           "$OIAFED_SECRET or a file given with --secret-file" in " ".join(capsys.readouterr().err.split())
