"""The server side of a deployment: a gRPC service that client processes connect to, and the
runtime through which the trainer sends them work.

Each client process holds one bidirectional ``Connect`` stream (see ``proto/oiafed.proto``).
For a round, the runtime sends every sampled client a ``TrainTask`` and the global weights in
chunks, and waits for each client's update (header + chunks) or error. A client that is not
connected, disconnects, is still busy with an earlier task, sends a malformed update or misses
the round deadline (``trainer.round_timeout``) gives a ``ClientFailure``; the trainer leaves it
out and fails the round below its quorum (``trainer.min_clients``). Nothing here waits on a
client without a bound: a dead connection ends its stream (the peer's socket closes, or
keepalive pings go unanswered for 10 s); a live client that hangs is bounded by
``round_timeout`` only.

``on_client_join`` fires for every client that joined (or rejoined) since the previous round,
when the runtime's ``train`` begins (after ``on_round_start``): hooks run in the trainer's
flow, never concurrently with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import grpc

from oiafed.core.types import ClientFailure, ClientUpdate, Weights
from oiafed.exceptions import DeploymentError, InputError
from oiafed.runtime.codec import WireError
from oiafed.runtime.grpc.auth import ServerSecurity
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.proto import oiafed_pb2_grpc as pb_grpc
from oiafed.runtime.grpc.tensors import Assembler, encode_chunks
from oiafed.runtime.grpc.wire import (
    PROTOCOL,
    SERVER_OPTIONS,
    fit_config_json,
    is_loopback,
    model_digest,
    parse_address,
)
from oiafed.runtime.worker import ClientWorker
from oiafed.state import STATE_FILE

logger = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0
"""Seconds ``close`` gives each client to take its Finish message and hang up."""


class _Task:
    """One client's task of one round; ``future`` resolves to its update or failure."""

    def __init__(self, task_id: int, round_num: int) -> None:
        self.task_id = task_id
        self.round_num = round_num
        self.future: asyncio.Future[ClientUpdate | ClientFailure] = (
            asyncio.get_running_loop().create_future())
        self.header: pb.UpdateHeader | None = None
        self.assembler: Assembler | None = None

    def resolve(self, outcome: ClientUpdate | ClientFailure) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


class Session:
    """One connected client process: its ``Connect`` call and the task it is working on."""

    def __init__(self, client_id: str, context: grpc.aio.ServicerContext, pid: int) -> None:
        self.client_id = client_id
        self.context = context
        self.peer = context.peer()
        self.pid = pid
        self.task: _Task | None = None
        self.ended = asyncio.Event()
        self._write_lock = asyncio.Lock()

    async def send(self, messages: list[pb.ServerMessage]) -> None:
        """Write ``messages`` in order (one sender at a time; a task's chunks stay together)."""
        async with self._write_lock:
            for message in messages:
                await self.context.write(message)

    def fail(self, reason: str) -> None:
        """Give the task in progress (if any) a ``ClientFailure``."""
        if self.task is not None:
            self.task.resolve(ClientFailure(self.client_id, reason))


class GrpcRuntime(pb_grpc.FederationServicer):
    """The runtime of ``runtime.mode: grpc``: a server that clients started elsewhere join.

    Args:
        worker: the server's client worker (it gives each client's training seed).
        address: ``HOST:PORT`` to listen on (port 0: any free port; see ``port``).
        security: the token and TLS material.
        min_join: clients that must have joined before the first round (default: all).
        join_timeout: seconds to wait for them (None: no limit).
    """

    def __init__(self, worker: ClientWorker, address: str, security: ServerSecurity, *,
                 min_join: int | None = None, join_timeout: float | None = None) -> None:
        self.host, port = parse_address(address, "runtime.address")
        security.check()
        self.address = address
        self.worker = worker
        self.security = security
        self.min_join = min_join
        self.join_timeout = join_timeout
        self.port = port
        self.trainer: Any = None
        self.sessions: dict[str, Session] = {}
        self._server: grpc.aio.Server | None = None
        self._joined: list[str] = []
        self._changed: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._next_task = 0
        self._limit = 0
        self._client_set: frozenset[str] = frozenset()

    # -- runtime interface ------------------------------------------------------------------

    async def start(self, trainer: Any) -> None:
        """Listen, then wait until ``min_join`` clients have joined."""
        self.trainer = trainer
        self._client_set = frozenset(trainer.client_ids)
        self._changed = asyncio.Event()
        try:
            await self._listen()
            needed = len(trainer.client_ids) if self.min_join is None else self.min_join
            await self._await_joins(min(needed, len(trainer.client_ids)))
        except BaseException:
            await self._shutdown(ok=False, reason="the server could not start")
            raise

    async def train(self, round_num: int, client_ids: list[str], weights: Weights,
                    config: dict[str, Any]) -> list[ClientUpdate | ClientFailure]:
        """Send this round's task to every client in ``client_ids``; their outcomes in order."""
        await self._fire_joins()
        size, pieces = encode_chunks(weights)
        # An update holds the same tensors as the global weights: anything much larger is not one.
        self._limit = 2 * size + (1 << 20)
        self._next_task += 1
        task_id = self._next_task
        pieces = list(pieces)
        inline = pieces.pop() if len(pieces) == 1 else b""  # one piece travels in the task
        messages = [pb.ServerMessage(chunk=pb.Chunk(task_id=task_id, data=piece))
                    for piece in pieces]
        config_json = fit_config_json(config)
        timeout = self.trainer.round_timeout
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        connected = sum(cid in self.sessions for cid in client_ids)
        # Below the quorum, a round waits (up to its deadline) for missing clients to come back.
        wait_join = deadline is not None and connected < self.trainer.min_clients
        return list(await asyncio.gather(*(
            self._train_one(cid, round_num, task_id, config_json, size, inline, messages,
                            deadline, wait_join)
            for cid in client_ids
        )))

    async def close(self) -> None:
        """Tell every client the run is over, wait briefly for them to hang up, stop."""
        trainer = self.trainer
        done = bool(trainer is not None and trainer.history
                    and trainer.history[-1]["round"] == trainer.round_num
                    and (trainer.round_num >= trainer.rounds or trainer.should_stop))
        if not done and trainer is not None:
            self._log_stopped(trainer)
        await self._shutdown(ok=done, reason="run completed" if done else
                             f"the run stopped in round {trainer.round_num if trainer else 0}")

    # -- service ---------------------------------------------------------------------------

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """A client's session (the token was checked by the interceptor)."""
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        hello = first.hello
        refusal = self._refusal(hello)
        if refusal is not None:
            code, message = refusal
            logger.warning("refused %s from %s: %s", hello.client_id or "a client", context.peer(),
                           message)
            await context.abort(code, message)
        session = Session(hello.client_id, context, hello.pid)
        await context.write(pb.ServerMessage(welcome=pb.Welcome(session_id=secrets.token_hex(8))))
        previous = self.sessions.get(session.client_id)
        if previous is not None:
            logger.warning("%s connected again from %s; its earlier connection is dropped",
                           session.client_id, session.peer)
            previous.fail("reconnected: the task of its earlier connection is lost")
        self.sessions[session.client_id] = session
        self._joined.append(session.client_id)
        logger.info("%s joined from %s (pid %d)", session.client_id, session.peer, session.pid)
        self._notify()
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                if self.sessions.get(session.client_id) is not session:
                    continue  # replaced by a newer connection: whatever it sends is stale
                try:
                    self._receive(session, message)
                except WireError as exc:
                    logger.warning("%s broke the protocol: %s", session.client_id, exc)
                    session.fail(f"malformed update: {exc}")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            session.fail("disconnected during the round")
            session.ended.set()
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                logger.info("%s left", session.client_id)
            self._notify()

    def _refusal(self, hello: pb.Hello) -> tuple[grpc.StatusCode, str] | None:
        if hello.protocol != PROTOCOL:
            return (grpc.StatusCode.FAILED_PRECONDITION,
                    f"the client speaks wire protocol {hello.protocol}, the server {PROTOCOL}: "
                    "run the same oiafed version on both")
        ids = self.trainer.client_ids
        if hello.client_id not in self._client_set:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"unknown client id {hello.client_id!r}: this federation has "
                    f"{ids[0]} .. {ids[-1]} ({len(ids)} clients)")
        config = self.trainer.config
        if config is not None and hello.model_digest != model_digest(config):
            return (grpc.StatusCode.FAILED_PRECONDITION,
                    "the client's model section differs from the server's: use the same config")
        return None

    def _receive(self, session: Session, message: pb.ClientMessage) -> None:
        kind = message.WhichOneof("kind")
        task = session.task
        if kind == "update":
            header = message.update
            if task is None or header.task_id != task.task_id:
                return  # the answer to a task given up on: dropped
            if task.header is not None:
                raise WireError("a second update header for one task")
            task.header = header
            task.assembler = Assembler(header.size, self._limit)
            if task.assembler.add(header.data):
                self._complete(session, task)
        elif kind == "chunk":
            chunk = message.chunk
            if task is None or chunk.task_id != task.task_id:
                return
            if task.assembler is None:
                raise WireError("weights sent before their update header")
            if task.assembler.add(chunk.data):
                self._complete(session, task)
        elif kind == "error":
            if task is not None and message.error.task_id == task.task_id:
                session.task = None
                task.resolve(ClientFailure(session.client_id,
                                           f"training failed: {message.error.error[:2000]}"))
        else:
            raise WireError(f"unexpected message {kind!r} in a session")

    def _complete(self, session: Session, task: _Task) -> None:
        session.task = None
        if task.future.done():
            return  # given up on already (deadline)
        header = task.header
        try:
            weights = task.assembler.weights()
        except WireError as exc:
            task.resolve(ClientFailure(session.client_id, f"malformed update: {exc}"))
            return
        task.resolve(ClientUpdate(session.client_id, int(header.num_samples),
                                  {k: float(v) for k, v in header.metrics.items()}, weights))

    # -- rounds ----------------------------------------------------------------------------

    async def _train_one(self, cid: str, round_num: int, task_id: int, config_json: str,
                         size: int, inline: bytes, messages: list[pb.ServerMessage],
                         deadline: float | None, wait_join: bool) -> ClientUpdate | ClientFailure:
        session = self.sessions.get(cid)
        if session is None and wait_join:
            session = await self._wait_for_session(cid, deadline)
        if session is None:
            return ClientFailure(cid, "not connected")
        if session.task is not None:
            return ClientFailure(cid, f"still busy with its round-{session.task.round_num} task")
        task = session.task = _Task(task_id, round_num)
        seed = self.worker.client_seed(cid, round_num)
        header = pb.ServerMessage(task=pb.TrainTask(task_id=task_id, round=round_num, seed=seed,
                                                    config_json=config_json, size=size,
                                                    data=inline))
        # Sending is not cancelled at the deadline (a half-sent task would confuse the stream);
        # a dead connection ends it, and the session then fails the task.
        self._spawn(session.send([header, *messages]))
        loop = asyncio.get_running_loop()
        try:
            if deadline is None:
                return await task.future
            return await asyncio.wait_for(asyncio.shield(task.future),
                                          max(0.0, deadline - loop.time()))
        except TimeoutError:
            outcome = ClientFailure(
                cid, f"no update within round_timeout={self.trainer.round_timeout:g}s")
            task.resolve(outcome)
            return outcome

    async def _wait_for_session(self, cid: str, deadline: float | None) -> Session | None:
        loop = asyncio.get_running_loop()
        while cid not in self.sessions:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return self.sessions[cid]

    async def _fire_joins(self) -> None:
        """``on_client_join`` for clients that joined since the last call, in the trainer's flow
        (so hooks never run concurrently with the trainer's own)."""
        joined, self._joined = self._joined, []
        for cid in joined:
            await self.trainer.callbacks.on_client_join(self.trainer, cid)

    # -- plumbing --------------------------------------------------------------------------

    async def _listen(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS,
                                 interceptors=self.security.interceptors())
        pb_grpc.add_FederationServicer_to_server(self, server)
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
        if credentials is None and self.security.token and not is_loopback(self.host):
            logger.warning("no TLS: the token and the weights cross the network in clear "
                           "(give --tls-cert and --tls-key)")
        logger.info("listening on %s:%d (%s, %s)", self.host, port,
                    "TLS" if credentials else "plaintext",
                    "token required" if self.security.token else "no token")

    async def _await_joins(self, needed: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if self.join_timeout is None else loop.time() + self.join_timeout
        if needed:
            logger.info("waiting for %d client(s) to join", needed)
        while len(self.sessions) < needed:
            self._check_clients()
            remaining = 1.0 if deadline is None else min(1.0, deadline - loop.time())
            if remaining <= 0:
                raise DeploymentError(
                    f"only {len(self.sessions)} of {needed} client(s) joined within "
                    f"runtime.join_timeout={self.join_timeout:g}s "
                    f"(joined: {', '.join(sorted(self.sessions)) or 'none'})")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _check_clients(self) -> None:
        """Raise ``DeploymentError`` when waiting for clients cannot succeed (loopback)."""

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("sending failed: %s", task.exception())

    async def _shutdown(self, *, ok: bool, reason: str) -> None:
        sessions = list(self.sessions.values())
        finish = pb.ServerMessage(finish=pb.Finish(ok=ok, reason=reason))

        async def tell(session: Session) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.send([finish]), SEND_TIMEOUT)
                await asyncio.wait_for(session.ended.wait(), SEND_TIMEOUT)

        await asyncio.gather(*(tell(s) for s in sessions))
        for task in list(self._background):
            task.cancel()
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None

    def _log_stopped(self, trainer: Any) -> None:
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is None:
            return
        if (run_dir / STATE_FILE).exists():
            logger.warning("the run stopped in round %d; the state after its last saved round "
                           "is in %s (continue with --resume %s)", trainer.round_num, run_dir,
                           run_dir)
