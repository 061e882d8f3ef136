"""Real deployments on 127.0.0.1: ``oiafed server`` and ``oiafed client`` processes, a loopback
``runtime.mode: grpc`` run, clients killed and restarted, a wrong token, mutual TLS.

Each test starts several Python processes that import torch, so they are few and marked slow;
every process is bounded by a timeout and killed in ``finally``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import oiafed
from oiafed import Callback
from oiafed.runtime.grpc.auth import client_token
from oiafed.state import load_state
from support import tiny_config, without_timing
from test_grpc_transport import TOKEN, make_certificates

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOOKS = '''
import asyncio
import os
import time
from pathlib import Path

from oiafed import Callback, register


def _append(path, line):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\\n")


@register("callback.epoch_pids")
class EpochPids(Callback):
    """Where each learner epoch ran: pid, client, round, epoch, metric names."""

    def __init__(self, path):
        self.path = path

    def on_epoch_end(self, learner, epoch, metrics, **kwargs):
        _append(self.path, f"{os.getpid()} {learner.client_id} {learner.round_num} {epoch} "
                           f"{','.join(sorted(metrics))}")


@register("callback.events")
class Events(Callback):
    """The server's join and failure hooks, one line each."""

    def __init__(self, path):
        self.path = path

    async def on_client_join(self, trainer, client_id, **kwargs):
        _append(self.path, f"join {trainer.round_num} {client_id} {os.getpid()}")

    async def on_client_failure(self, trainer, client_id, error, **kwargs):
        _append(self.path, f"failure {trainer.round_num} {client_id} {error}")


@register("callback.gate")
class Gate(Callback):
    """Holds the server at the end of the given rounds until the test says go (async: the
    server keeps serving its clients meanwhile)."""

    def __init__(self, folder, rounds):
        self.folder = Path(folder)
        self.rounds = rounds

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        if round_num not in self.rounds:
            return
        (self.folder / f"waiting-{round_num}").touch()
        deadline = time.monotonic() + 120
        while not (self.folder / f"go-{round_num}").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


@register("callback.crash")
class Crash(Callback):
    """The learner process of one client dies in one round (only ever used with grpc)."""

    def __init__(self, client_id, round_num):
        self.client_id = client_id
        self.round_num = round_num

    def on_epoch_end(self, learner, epoch, metrics, **kwargs):
        if learner.client_id == self.client_id and learner.round_num == self.round_num:
            os._exit(3)
'''


class Joins(Callback):
    def __init__(self) -> None:
        self.joined: list[tuple[int, str]] = []

    async def on_client_join(self, trainer, client_id, **kwargs):
        self.joined.append((trainer.round_num, client_id))


@pytest.fixture
def hooks(user_module: Callable[[str, str], Path]) -> Path:
    """The test callbacks as the module ``grpc_test_hooks``; returns its folder."""
    return user_module("grpc_test_hooks", HOOKS).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same_history(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    got, expected = without_timing(got), without_timing(expected)
    assert [sorted(row) for row in got] == [sorted(row) for row in expected]
    for row, want in zip(got, expected, strict=True):
        for key, value in want.items():
            assert math.isclose(row[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, row, want)


# -- loopback: one command, the same results as serial --------------------------------------------


def test_loopback_deployment_equals_serial_and_runs_learner_hooks_in_the_clients(tmp_path, hooks):
    config = tiny_config(imports=["grpc_test_hooks"],
                         learner={"args": {"lr": 0.05, "batch_size": 32, "epochs": 2}},
                         trainer={"args": {"rounds": 3}})
    serial = oiafed.run({**config, "callbacks": [
        {"type": "epoch_pids", "args": {"path": str(tmp_path / "serial_epochs.txt")}}]},
        run_dir=tmp_path / "serial")
    joins = Joins()
    deployed = oiafed.run({**config, "runtime": {"mode": "grpc"}, "callbacks": [
        {"type": "epoch_pids", "args": {"path": str(tmp_path / "epochs.txt")}}]},
        run_dir=tmp_path / "grpc", callbacks=[joins])

    assert deployed.rounds_completed == 3 and deployed.stop_reason == "completed"
    assert_same_history(deployed.history, serial.history)
    for key, value in serial.weights.items():
        torch.testing.assert_close(deployed.weights[key], value, rtol=1e-5, atol=1e-7)

    lines = [line.split() for line in (tmp_path / "epochs.txt").read_text().splitlines()]
    assert len(lines) == 3 * 4 * 2  # rounds x clients x epochs, all in client processes
    pids = {client: {int(pid) for pid, c, *_ in lines if c == client}
            for client in ("client_0", "client_1", "client_2", "client_3")}
    assert all(len(p) == 1 for p in pids.values()), pids  # one process per client ...
    assert len(set.union(*pids.values())) == 4             # ... four of them ...
    assert os.getpid() not in set.union(*pids.values())     # ... none of them this one
    assert {fields[4] for fields in lines} == {"accuracy,loss"}
    assert sorted(c for _, c in joins.joined) == ["client_0", "client_1", "client_2", "client_3"]
    assert {r for r, _ in joins.joined} == {1}
    logs = sorted(p.name for p in (tmp_path / "grpc" / "clients").iterdir())
    assert logs == [f"client_{i}.log" for i in range(4)]
    assert "the server ended the run: completed" in (
        tmp_path / "grpc" / "clients" / "client_2.log").read_text()


# -- oiafed server + oiafed client: mutual TLS, a wrong token, a client killed and restarted ------


class Processes:
    """Processes started by a test, all killed at the end."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.started: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        log = open(self.cwd / f"{name}.log", "w")  # noqa: SIM115 - the process owns it
        process = subprocess.Popen([sys.executable, "-m", "oiafed.cli", *args], cwd=self.cwd,
                                   env={**self.env, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, text=True)
        log.close()
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.cwd / f"{name}.log").read_text()

    def wait(self, name: str, timeout: float = 120) -> int:
        try:
            return self.started[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not end in {timeout}s:\n{self.log(name)}")

    def kill_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def processes(tmp_path: Path, hooks: Path) -> Iterator[Processes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), *sys.path]),
           "OMP_NUM_THREADS": "1", "COLUMNS": "250", "NO_COLOR": "1"}
    env.pop("OIAFED_TOKEN", None)
    env.pop("OIAFED_SECRET", None)
    group = Processes(tmp_path, env)
    try:
        yield group
    finally:
        group.kill_all()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_server_and_clients_over_mutual_tls_survive_a_killed_client(tmp_path, processes):
    certs = make_certificates(tmp_path, {f"client_{i}": [f"client_{i}"] * 2 for i in range(4)})
    (tmp_path / "secret").write_text(TOKEN + "\n")
    gates = tmp_path / "gates"
    gates.mkdir()
    config = tiny_config(imports=["grpc_test_hooks"],
                         trainer={"args": {"rounds": 4, "min_clients": 3, "round_timeout": 60}},
                         callbacks=[{"type": "events", "args": {"path": str(tmp_path / "events.txt")}},
                                    {"type": "gate", "args": {"folder": str(gates), "rounds": [1, 2]}}])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"

    def client(name: str, cid: str, token: str | None = None) -> subprocess.Popen[str]:
        tls = ["--tls-ca", str(certs["ca.pem"]), "--tls-cert", str(certs[f"{cid}.pem"]),
               "--tls-key", str(certs[f"{cid}.key"])]
        return processes.start(name, "client", "config.yaml", "--server", address,
                               "--client-id", cid, "--threads", "1", *tls,
                               env={"OIAFED_TOKEN": token or client_token(TOKEN, cid)})

    processes.start("server", "server", "config.yaml", "--address", address, "--run-dir", "run",
                    "--secret-file", "secret", "--tls-cert", str(certs["server.pem"]),
                    "--tls-key", str(certs["server.key"]), "--tls-client-ca", str(certs["ca.pem"]))
    for i in range(4):
        client(f"client_{i}", f"client_{i}")

    wait_for(lambda: (gates / "waiting-1").exists(), "round 1")
    victim = processes.started["client_3"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    client("intruder", "client_0", token="a-wrong-guess")
    assert processes.wait("intruder") == 2
    (gates / "go-1").touch()

    wait_for(lambda: (gates / "waiting-2").exists(), "round 2")
    client("client_3_again", "client_3")
    wait_for(lambda: "joined" in processes.log("client_3_again"), "client_3 to rejoin")
    (gates / "go-2").touch()

    assert processes.wait("server") == 0, processes.log("server")
    for name in ("client_0", "client_1", "client_2", "client_3_again"):
        assert processes.wait(name) == 0, processes.log(name)
        assert "the server ended the run: completed" in processes.log(name)
    assert victim.returncode == -signal.SIGKILL

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["num_clients"] for row in rows] == [4, 3, 4, 4]
    assert all(0 <= row["accuracy"] <= 1 for row in rows)
    assert "missing or wrong token" in processes.log("intruder")
    assert "UNAUTHENTICATED" in processes.log("intruder")

    events = (tmp_path / "events.txt").read_text().splitlines()
    joins = [line.split()[1:3] for line in events if line.startswith("join")]
    assert sorted(joins[:4]) == [["1", f"client_{i}"] for i in range(4)]
    assert joins[4:] == [["3", "client_3"]]  # the restarted client, as round 3 starts
    failures = [line.split(maxsplit=3)[1:] for line in events if line.startswith("failure")]
    assert len(failures) == 1 and failures[0][:2] == ["2", "client_3"]
    assert failures[0][2] in ("disconnected during the round", "not connected")
    assert "refused a connection from ipv4:127.0.0.1" in processes.log("server")


# -- a crash below the quorum fails the run cleanly; it resumes with a lower quorum --------------


def test_below_quorum_the_run_fails_cleanly_and_resumes(tmp_path, processes):
    config = tiny_config(imports=["grpc_test_hooks"], runtime={"mode": "grpc"},
                         trainer={"args": {"rounds": 3, "min_clients": 4}},
                         callbacks=[{"type": "crash",
                                     "args": {"client_id": "client_3", "round_num": 2}}])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    processes.start("run", "run", "config.yaml", "--run-dir", "run", "-q")
    assert processes.wait("run") == 1, processes.log("run")
    output = processes.log("run")
    assert ("failed: RoundFailed: round 2: 3 usable client update(s), fewer than min_clients=4 "
            "(client_3: disconnected during the round)") in " ".join(output.split())
    assert "Traceback" not in output
    assert "the run failed after round 1; its state is saved in" in " ".join(output.split())
    assert "continue it with --resume" in output
    state = load_state(tmp_path / "run")
    assert state["trainer"]["round_num"] == 1
    client_log = (tmp_path / "run" / "clients" / "client_0.log").read_text()
    assert "client_0: the server ended the run: failed in round 2: RoundFailed" in client_log

    processes.start("resume", "run", "--resume", "run", "trainer.args.min_clients=3", "-q")
    assert processes.wait("resume") == 0, processes.log("resume")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["num_clients"]) for row in rows] == [(1, 4), (2, 3), (3, 3)]


def test_bad_deployment_input_exits_2(tmp_path, processes):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    processes.start("no_token", "server", "config.yaml", "--address", "127.0.0.1:0")
    processes.start("bad_id", "client", "config.yaml", "--server", "127.0.0.1:1",
                    "--client-id", "client_9", env={"OIAFED_TOKEN": "x"})
    processes.start("bad_address", "client", "config.yaml", "--server", "nowhere",
                    "--client-id", "client_0", env={"OIAFED_TOKEN": "x"})
    processes.start("unreachable", "client", "config.yaml", "--server", "127.0.0.1:1",
                    "--client-id", "client_0", "--reconnect-timeout", "0.5",
                    env={"OIAFED_TOKEN": "x"})
    assert processes.wait("no_token") == 2
    assert "no secret: the server needs the secret that clients' tokens derive from in " \
           "$OIAFED_SECRET" in " ".join(processes.log("no_token").split())
    assert not (tmp_path / "runs").exists()
    assert processes.wait("bad_id") == 2
    assert "unknown client id 'client_9': the config has client_0 .. client_3" in processes.log("bad_id")
    assert processes.wait("bad_address") == 2
    assert "--server must look like HOST:PORT, got 'nowhere'" in processes.log("bad_address")
    assert processes.wait("unreachable") == 1
    assert "could not reach the server 127.0.0.1:1 for 0.5s" in processes.log("unreachable")


def test_a_client_can_train_on_a_local_dataset(tmp_path):
    """``--local-data``: the configured dataset, whole, is this client's training data."""
    from oiafed.core.types import ClientTask, RoundTask
    from oiafed.data.federated import build_federated_data
    from oiafed.runtime.envelope import decode_update, encode_client, encode_round
    from oiafed.runtime.grpc.client import build_worker
    from oiafed.runtime.worker import build_model

    cfg = oiafed.load_config(tiny_config(data={"type": "digits", "num_clients": 4}))
    worker = build_worker(cfg, "client_2", local_data=True)
    model = build_model(cfg, build_federated_data(cfg.data, cfg.seed))
    reply = worker.execute(encode_round(RoundTask(1, model.state_dict(), {"lr": 0.05})),
                           encode_client(ClientTask("client_2", 7)))
    assert reply.update is not None, reply.traceback
    update = decode_update(reply.update.to_bytes())
    assert update.num_samples == 1797  # all of digits, not a quarter of 80 % of it
    assert update.weights.keys() == model.state_dict().keys()


def test_a_local_data_client_holds_out_its_local_test_set(tmp_path):
    """``--local-data`` with ``data.local_test_fraction``: the client's own dataset less its
    local test set trains; personal evaluation runs on that test set."""
    from oiafed.core.learner import EVALUATE, TASK
    from oiafed.core.types import ClientTask, RoundTask
    from oiafed.runtime.envelope import decode_update, encode_client, encode_round
    from oiafed.runtime.grpc.client import build_worker
    from oiafed.runtime.worker import build_model

    cfg = oiafed.load_config(tiny_config(data={"type": "digits", "num_clients": 4,
                                               "local_test_fraction": 0.2}))
    worker = build_worker(cfg, "client_2", local_data=True)
    assert worker.local is not None and worker.local_test is not None
    held_out = len(worker.local_test)
    assert len(worker.local) + held_out == 1797 and 340 <= held_out <= 380
    assert torch.bincount(worker.local_test.y).min() >= 30  # stratified: every digit held out
    weights = build_model(cfg, worker.local).state_dict()
    replies = [worker.execute(encode_round(RoundTask(1, weights, {"lr": 0.05}, {}, values)),
                              encode_client(ClientTask("client_2", 7)))
               for values in ({}, {TASK: EVALUATE})]
    trained, evaluated = (decode_update(reply.update.to_bytes()) for reply in replies)
    assert trained.num_samples == 1797 - held_out
    assert evaluated.num_samples == held_out and 0 <= evaluated.metrics["accuracy"] <= 1


ECHO_CLIENT = """
import os, sys
from oiafed import ClientUpdate
from oiafed.runtime.envelope import decode_round, pack_update
from oiafed.runtime.grpc import ClientSecurity
from oiafed.runtime.grpc.client import FederationClient
from oiafed.runtime.worker import TaskReply

def execute(round_data, client_data):
    weights = decode_round(round_data).weights
    return TaskReply(pack_update(ClientUpdate("client_0", 1, {"accuracy": 1.0, "loss": 0.0},
                                                weights)))

FederationClient(sys.argv[1], "client_0", execute, ClientSecurity(os.environ["OIAFED_TOKEN"])).run()
"""


def test_a_frozen_client_process_is_dropped_without_a_round_timeout():
    """SIGSTOP: the socket stays open but nothing answers; keepalive pings find it out."""
    import asyncio

    from oiafed.runtime.grpc import ServerSecurity
    from test_grpc_transport import Served, make_trainer

    trainer = make_trainer(1)  # round_timeout None: only the connection can tell
    weights = {"w": torch.zeros(3)}

    async def scenario():
        runtime = Served(trainer, "127.0.0.1:0", ServerSecurity(TOKEN), min_join=0)
        await runtime.start()
        client = subprocess.Popen([sys.executable, "-c", ECHO_CLIENT, f"127.0.0.1:{runtime.port}"],
                                  env={**os.environ, "OIAFED_TOKEN": client_token(TOKEN, "client_0")})
        try:
            deadline = time.monotonic() + 120
            while "client_0" not in runtime.sessions:
                assert time.monotonic() < deadline and client.poll() is None
                await asyncio.sleep(0.05)
            first = await runtime.train(1, ["client_0"], weights, {})
            client.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            second = await asyncio.wait_for(runtime.train(2, ["client_0"], weights, {}), 90)
            return first, second, time.monotonic() - started
        finally:
            client.kill()
            client.wait()
            await runtime.close()

    first, second, waited = asyncio.run(scenario())
    assert first[0].metrics == {"accuracy": 1.0, "loss": 0.0}
    assert second[0].error == "disconnected during the round"
    assert waited < 45  # keepalive: a ping every 20 s, 10 s to answer
