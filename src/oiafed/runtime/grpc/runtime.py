"""The runtime of ``runtime.mode: grpc``: a server that client processes started elsewhere join.

For a round, every sampled client gets a ``TrainTask`` whose payload is the round's envelope
followed by the client's (chunked when large), through the ``FederationService``; each
client's reply goes into the round's ``RoundLedger``, so failures follow the policy every
runtime shares. A client that is not connected, is still busy with an earlier task, hangs up,
sends a malformed update or misses the deadline fails for the round; the trainer leaves it out
and fails the round below its quorum. Below the quorum, a round with a deadline waits (up to
it) for missing clients to come back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Container, Sequence

import grpc

from oiafed.core.learner import EVALUATE, TASK
from oiafed.core.types import ClientTask, Outcome, RoundTask
from oiafed.data.federated import id_set
from oiafed.exceptions import ConfigError, DeploymentError, InputError
from oiafed.runtime.base import RoundLedger, RunEnd, RunSpec, Runtime
from oiafed.runtime.envelope import encode_client, pack_round
from oiafed.runtime.grpc.auth import ServerSecurity
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.proto import oiafed_pb2_grpc as pb_grpc
from oiafed.runtime.grpc.secure import SecureSettings, secure_train
from oiafed.runtime.grpc.service import FederationService, Reply
from oiafed.runtime.grpc.wire import SERVER_OPTIONS, is_loopback, model_digest, parse_address
from oiafed.runtime.tensors import CHUNK_SIZE

logger = logging.getLogger(__name__)

FINISH_GRACE = 10.0
"""Seconds ``close`` gives each client to take its Finish message and hang up."""


class GrpcRuntime(Runtime):
    """Serves a deployment: listens, waits for clients to join, sends them each round's tasks.

    Args:
        address: ``HOST:PORT`` to listen on (port 0: any free port; see ``port``).
        security: the token and TLS material.
        min_join: clients that must have joined before the first round (default: all).
        join_timeout: seconds to wait for them (None: no limit).
        hello_timeout: seconds a new stream has to say Hello before it is closed.
        max_streams: the most streams open at once (None: twice the number of clients, plus
            16); more are refused and their clients retry.
    """

    def __init__(self, address: str, security: ServerSecurity, *,
                 min_join: int | None = None, join_timeout: float | None = None,
                 hello_timeout: float = 10.0, max_streams: int | None = None) -> None:
        self.host, self.port = parse_address(address, "runtime.address")
        security.check()
        self.address = address
        self.security = security
        self.min_join = min_join
        self.join_timeout = join_timeout
        self.hello_timeout = hello_timeout
        self.max_streams = max_streams
        self.spec = RunSpec(client_ids=(), num_sampled=0)
        self.service: FederationService | None = None
        self._server: grpc.aio.Server | None = None
        self._client_set: Container[str] = frozenset()
        self._digest = ""
        self._next_task = 0
        self.secure: SecureSettings | None = None
        """Secure aggregation's settings (``runtime.secure_aggregation``; None: off)."""
        self.session_id = secrets.token_bytes(16)
        """This run's random id, in every secure-aggregation key derivation."""

    @property
    def sessions(self) -> dict[str, object]:
        """The connected clients' sessions, by client id."""
        return dict(self.service.sessions) if self.service is not None else {}

    # -- the runtime contract --------------------------------------------------------------

    async def start(self, spec: RunSpec) -> None:
        """Listen, then wait until ``min_join`` clients have joined."""
        self.spec = spec
        self._client_set = id_set(spec.client_ids)
        self._digest = model_digest(spec.config) if spec.config is not None else ""
        self.service = FederationService(
            self._check_hello, hello_timeout=self.hello_timeout,
            max_streams=self.max_streams or 2 * len(spec.client_ids) + 16)
        try:
            await self._listen()
            total = len(spec.client_ids)
            if self.min_join is not None and self.min_join > total:
                logger.warning("runtime.min_join is %d but the federation has %d clients "
                               "(data.num_clients): waiting for %d", self.min_join, total, total)
            await self._await_joins(min(total if self.min_join is None else self.min_join, total))
        except BaseException:
            await self._shutdown(ok=False, reason="the server could not start")
            raise

    def take_joins(self) -> list[str]:
        if self.service is None:
            return []
        joined, self.service.joined = self.service.joined, []
        return joined

    async def train(self, task: RoundTask, clients: Sequence[ClientTask],
                    deadline: float | None) -> list[Outcome]:
        if self.secure is not None:
            if task.extra_values.get(TASK) == EVALUATE:  # refused at config load (secagg.checks)
                raise ConfigError("personal evaluation would send each client's metrics to the "
                                  "server in clear, past runtime.secure_aggregation",
                                  "data.local_test_fraction")
            return await secure_train(self, self.secure, task, clients, deadline)
        service = self._service()
        ledger = RoundLedger(task.round_num, [c.client_id for c in clients], deadline,
                             round_timeout=self.spec.round_timeout, strict=self.spec.strict)
        while ledger.take() is not None:  # every client is sent its task at once
            pass
        round_data = pack_round(task)
        self._next_task += 1
        task_id = self._next_task  # one per round: a client has one task at a time
        # a small round travels inside each client's task; a large one in chunks sent to all
        small = round_data.to_bytes() if round_data.size < CHUNK_SIZE else None
        shared = [] if small is not None else [
            pb.ServerMessage(chunk=pb.Chunk(task_id=task_id, data=piece))
            for piece in round_data.pieces(CHUNK_SIZE)]
        connected = sum(c.client_id in service.sessions for c in clients)
        # Below the quorum, a round waits (up to its deadline) for missing clients to come back.
        wait_join = deadline is not None and connected < self.spec.min_clients
        replies = await asyncio.gather(*(
            self._train_one(ledger, task_id, round_data.size, small, shared, client, wait_join)
            for client in clients))
        for client, reply in zip(clients, replies, strict=True):
            cid = client.client_id
            if reply is None:
                continue  # the deadline came first: expired below
            if reply.update is not None:
                ledger.answered(cid, reply.update)
            elif reply.traceback:
                ledger.raised(cid, reply.traceback)
            else:
                ledger.failed(cid, reply.failure, reply.kind)
        if not ledger.done:
            ledger.expire()
        return ledger.results()

    async def close(self, end: RunEnd | None = None) -> None:
        """Tell every client how the run ended, wait briefly for them to hang up, stop."""
        end = end or RunEnd(ok=False, reason="the server stopped")
        await self._shutdown(ok=end.ok, reason=end.reason)

    # -- rounds ----------------------------------------------------------------------------

    async def _train_one(self, ledger: RoundLedger, task_id: int, round_size: int,
                         small: bytes | None, shared: list[pb.ServerMessage],
                         client: ClientTask, wait_join: bool, masked_size: int = 0
                         ) -> Reply | None:
        """Send ``client`` its task: in one message when it fits, else the round's part
        (``small``, or the chunks ``shared`` by the round's clients) and its own in chunks.
        Its ``Reply``, or None when the deadline came first. ``masked_size``: the bytes of a
        secure task's masked input (0: not secure)."""
        service = self._service()
        cid = client.client_id
        if cid not in service.sessions and wait_join:
            await self._wait_for_session(cid, ledger)
        client_data = encode_client(client)
        size = round_size + len(client_data)
        header = pb.TrainTask(task_id=task_id, round=ledger.round_num,
                              round_size=round_size, size=size, secure=masked_size > 0)
        if small is not None and size <= CHUNK_SIZE:  # one message
            header.data = small + client_data
            messages = [pb.ServerMessage(task=header)]
        else:  # the round's chunks, then the client's
            pieces = [] if small is None else cut(small)
            messages = [pb.ServerMessage(task=header), *shared]
            messages += [pb.ServerMessage(chunk=pb.Chunk(task_id=task_id, data=piece))
                         for piece in [*pieces, *cut(client_data)]]
        # An update holds about what a task holds: anything much larger is not one.
        future = service.assign(cid, task_id, ledger.round_num,
                                max(2 * size, masked_size) + (1 << 20), messages)
        try:
            return await asyncio.wait_for(asyncio.shield(future), ledger.remaining())
        except TimeoutError:
            if (session := service.sessions.get(cid)) is not None:
                session.fail("the round's deadline passed", "timeout")
            return None

    async def _wait_for_session(self, cid: str, ledger: RoundLedger) -> None:
        service = self._service()
        while cid not in service.sessions and not ledger.expired:
            await service.changed(ledger.remaining())

    # -- plumbing --------------------------------------------------------------------------

    def _service(self) -> FederationService:
        if self.service is None:
            raise RuntimeError("GrpcRuntime.start() must be called first")
        return self.service

    def _check_hello(self, hello: pb.Hello, context: grpc.aio.ServicerContext
                     ) -> tuple[grpc.StatusCode, str] | None:
        ids = self.spec.client_ids
        if (reason := self.security.identity_refusal(hello.client_id, context)) is not None:
            return grpc.StatusCode.PERMISSION_DENIED, reason
        if hello.client_id not in self._client_set:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"unknown client id {hello.client_id!r}: this federation has "
                    f"{ids[0]} .. {ids[-1]} ({len(ids)} clients)")
        if self._digest and hello.model_digest != self._digest:
            return (grpc.StatusCode.FAILED_PRECONDITION,
                    "the client's model section differs from the server's: use the same config")
        return None

    async def _listen(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS,
                                 interceptors=self.security.interceptors())
        pb_grpc.add_FederationServicer_to_server(self._service(), server)
        credentials = self.security.credentials()
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            if credentials is None:
                port = server.add_insecure_port(target)
            else:
                port = server.add_secure_port(target, credentials)
        except RuntimeError as exc:
            raise InputError(f"cannot listen on {target}: {exc}") from exc
        if not port:
            raise InputError(f"cannot listen on {target} (in use, or not an address of this host)")
        self.port = port
        self._server = server
        await server.start()
        if credentials is None and self.security.secret and not is_loopback(self.host):
            logger.warning("no TLS: the token and the weights cross the network in clear "
                           "(give --tls-cert and --tls-key)")
        logger.info("listening on %s:%d (%s, %s)", self.host, port,
                    "TLS" if credentials else "plaintext",
                    "client tokens required" if self.security.secret else "no token")
        await self._listening()

    async def _listening(self) -> None:
        """Called once the server listens (a loopback deployment starts its clients here)."""

    async def _await_joins(self, needed: int) -> None:
        service = self._service()
        deadline = None if self.join_timeout is None else time.monotonic() + self.join_timeout
        if needed:
            logger.info("waiting for %d client(s) to join", needed)
        while len(service.sessions) < needed:
            self._check_clients()
            remaining = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if remaining <= 0:
                raise DeploymentError(
                    f"only {len(service.sessions)} of {needed} client(s) joined within "
                    f"runtime.join_timeout={self.join_timeout:g}s "
                    f"(joined: {', '.join(sorted(service.sessions)) or 'none'})")
            await service.changed(remaining)

    def _check_clients(self) -> None:
        """Raise ``DeploymentError`` when waiting for clients cannot succeed (loopback)."""

    async def _shutdown(self, *, ok: bool, reason: str) -> None:
        if self.service is not None:
            await self.service.finish(ok, reason, FINISH_GRACE)
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None


def cut(data: bytes) -> list[bytes]:
    """``data`` in pieces of at most ``CHUNK_SIZE`` bytes."""
    return [data[i:i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
