"""The server's gRPC service: client sessions on ``Connect`` streams, and the tasks sent on them.

Each client process holds one bidirectional ``Connect`` stream (see ``proto/oiafed.proto``).
The service checks each Hello (protocol, the caller's right to the client id, the id, the
model), keeps one ``Session`` per connected client (a second connection for a connected id is
refused, never a takeover), sends a task's messages and resolves the task's future with the client's
``Reply``: the update's envelope, the traceback of training that raised, or why the client
gave neither (it disconnected, broke the protocol). It never opens an envelope and knows
nothing of rounds' bookkeeping, which is the runtime's (``runtime.py``). A dead connection
ends its stream (the peer's socket closes, or keepalive pings go unanswered for 10 s), and so
does silence: a stream without a Hello within ``hello_timeout`` seconds. At most
``max_streams`` streams are open at once. What a peer sent is logged escaped (``logs.shown``)
and repeated refusals are throttled (``logs.LogThrottle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from oiafed.client_state import CLIENT_ID_PATTERN
from oiafed.exceptions import WireError
from oiafed.runtime.envelope import PROTOCOL
from oiafed.runtime.grpc.logs import LogThrottle, shown
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.proto import oiafed_pb2_grpc as pb_grpc
from oiafed.runtime.tensors import Assembler

logger = logging.getLogger(__name__)

INBOX = 8
"""The most secure-aggregation messages a session holds unread (a round has 3 per client)."""


@dataclass(frozen=True)
class Reply:
    """A client's answer to a task: the update's envelope bytes, the traceback of training
    that raised, or the ``failure`` (with its ``kind``) that left it without either."""

    update: bytearray | None = None
    traceback: str = ""
    failure: str = ""
    kind: str = ""


@dataclass
class Traffic:
    """The bytes of the (serialized) messages the service sent to and received from clients
    since it started, Hellos and Welcomes included; gRPC's own framing is not counted."""

    sent: int = 0
    received: int = 0


class _Task:
    """One client's task; ``future`` resolves to its ``Reply``."""

    def __init__(self, task_id: int, round_num: int, limit: int) -> None:
        self.task_id = task_id
        self.round_num = round_num
        self.limit = limit
        self.future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.assembler: Assembler | None = None

    def resolve(self, reply: Reply) -> None:
        if not self.future.done():
            self.future.set_result(reply)


class Session:
    """One connected client process: its ``Connect`` call and the task it is working on."""

    def __init__(self, client_id: str, context: grpc.aio.ServicerContext, pid: int,
                 traffic: Traffic | None = None) -> None:
        self.client_id = client_id
        self.traffic = traffic or Traffic()
        self.context = context
        self.peer = context.peer()
        self.pid = pid
        self.task: _Task | None = None
        self.ended = asyncio.Event()
        self.inbox: asyncio.Queue[pb.SecAgg] = asyncio.Queue(INBOX)
        """Secure-aggregation messages, for the runtime to read (``runtime.secure``)."""
        self._write_lock = asyncio.Lock()

    async def send(self, messages: Collection[pb.ServerMessage]) -> None:
        """Write ``messages`` in order (one sender at a time; a task's chunks stay together)."""
        async with self._write_lock:
            for message in messages:
                self.traffic.sent += message.ByteSize()
                await self.context.write(message)

    def fail(self, reason: str, kind: str) -> None:
        """Give the task in progress (if any) a failed ``Reply``."""
        if self.task is not None:
            self.task.resolve(Reply(failure=reason, kind=kind))


HelloCheck = Callable[[pb.Hello, grpc.aio.ServicerContext], "tuple[grpc.StatusCode, str] | None"]


class FederationService(pb_grpc.FederationServicer):
    """The ``Federation`` service of one run.

    Args:
        check_hello: why a Hello on a call is refused (a status code and a message), or None.
        hello_timeout: seconds a new stream has to say Hello before it is closed.
        max_streams: the most streams open at once (sessions and streams yet to say Hello);
            more are refused with ``RESOURCE_EXHAUSTED`` (a client retries).
    """

    def __init__(self, check_hello: HelloCheck, *, hello_timeout: float,
                 max_streams: int) -> None:
        self.check_hello = check_hello
        self.hello_timeout = hello_timeout
        self.max_streams = max_streams
        self.streams = 0
        """Streams open now."""
        self._refusals = LogThrottle(logger)
        self.sessions: dict[str, Session] = {}
        self.joined: list[str] = []
        """Clients that joined (or rejoined), in order, until the runtime takes them."""
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self.traffic = Traffic()
        """Bytes sent and received so far (all sessions)."""

    # -- what the runtime calls ------------------------------------------------------------

    def assign(self, client_id: str, task_id: int, round_num: int, limit: int,
               messages: Iterator[pb.ServerMessage] | list[pb.ServerMessage]
               ) -> asyncio.Future[Reply]:
        """Send ``client_id`` a task; the future resolves to its ``Reply``. A client that is
        not connected, or still busy with an earlier task, gets a failed ``Reply`` at once.
        An update over ``limit`` bytes is refused.
        """
        session = self.sessions.get(client_id)
        if session is None:
            return _done(Reply(failure="not connected", kind="disconnected"))
        if session.task is not None:
            return _done(Reply(failure=f"still busy with its round-{session.task.round_num} task",
                               kind="busy"))
        task = session.task = _Task(task_id, round_num, limit)
        # Sending is not cancelled at the deadline (a half-sent task would confuse the stream);
        # a dead connection ends it, and the session then fails the task.
        self._spawn(session.send(list(messages)))
        return task.future

    async def changed(self, timeout: float | None) -> None:
        """Wait (at most ``timeout`` seconds) until a client joins or leaves."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def finish(self, ok: bool, reason: str, grace: float) -> None:
        """Tell every client the run is over and wait (up to ``grace`` s each) for it to hang up."""
        finish = pb.ServerMessage(finish=pb.Finish(ok=ok, reason=reason))

        async def tell(session: Session) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.send([finish]), grace)
                await asyncio.wait_for(session.ended.wait(), grace)

        await asyncio.gather(*(tell(s) for s in list(self.sessions.values())))
        for task in list(self._background):
            task.cancel()

    # -- the service -----------------------------------------------------------------------

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """A client's stream (the token was checked by the interceptor), unless
        ``max_streams`` are open."""
        if self.streams >= self.max_streams:
            self._refusals.warning("max_streams", "refused a stream from %s: %d are open "
                                   "(runtime.max_streams)", context.peer(), self.streams)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the server has runtime.max_streams={self.max_streams} streams "
                                "open: try again later")
        self.streams += 1
        try:
            await self._session(context)
        finally:
            self.streams -= 1

    async def _session(self, context: grpc.aio.ServicerContext) -> None:
        """A client's session: its Hello (within ``hello_timeout`` seconds), then its messages."""
        try:
            first = await asyncio.wait_for(context.read(), self.hello_timeout)
        except TimeoutError:
            self._refusals.warning("hello_timeout", "closed a stream from %s: no Hello within "
                                   "%gs (runtime.hello_timeout)", context.peer(), self.hello_timeout)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no Hello within runtime.hello_timeout={self.hello_timeout:g}s")
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            self._refusals.warning("no_hello", "refused a stream from %s: its first message is "
                                   "not Hello", context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        hello = first.hello
        refusal = self._refusal(hello, context)
        if refusal is not None:
            code, message = refusal
            self._refusals.warning(code.name, "refused %s from %s: %s",
                                   shown(hello.client_id), context.peer(), message)
            await context.abort(code, message)
        # Registered with no await since _refusal: two Hellos for one id cannot both pass it.
        session = self.sessions[hello.client_id] = Session(hello.client_id, context, hello.pid,
                                                           self.traffic)
        self.traffic.received += first.ByteSize()
        self.joined.append(session.client_id)
        try:
            await session.send([pb.ServerMessage(welcome=pb.Welcome(session_id=secrets.token_hex(8)))])
            logger.info("%s joined from %s (pid %d)", session.client_id, session.peer, session.pid)
            self._notify()
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                self.traffic.received += message.ByteSize()
                try:
                    self._receive(session, message)
                except WireError as exc:
                    logger.warning("%s broke the protocol: %s", session.client_id, exc)
                    session.fail(f"malformed update: {exc}", "malformed")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            session.fail("disconnected during the round", "disconnected")
            session.ended.set()
            del self.sessions[session.client_id]
            logger.info("%s left", session.client_id)
            self._notify()

    def _refusal(self, hello: pb.Hello, context: grpc.aio.ServicerContext
                 ) -> tuple[grpc.StatusCode, str] | None:
        if hello.protocol != PROTOCOL:
            return (grpc.StatusCode.FAILED_PRECONDITION,
                    f"the client speaks wire protocol {hello.protocol}, the server {PROTOCOL}: "
                    "run the same oiafed version on both")
        if not CLIENT_ID_PATTERN.fullmatch(hello.client_id):
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    f"{shown(hello.client_id)} is not a valid client id: use letters, digits, "
                    "'_', '.', '-' (not first), at most 200 characters")
        refusal = self.check_hello(hello, context)
        if refusal is None and (other := self.sessions.get(hello.client_id)) is not None:
            return (grpc.StatusCode.ALREADY_EXISTS,
                    f"{hello.client_id} is already connected (from {other.peer}, pid {other.pid}):"
                    " a second connection is refused")
        return refusal

    def _receive(self, session: Session, message: pb.ClientMessage) -> None:
        kind = message.WhichOneof("kind")
        task = session.task
        if kind == "update":
            header = message.update
            if task is None or header.task_id != task.task_id:
                return  # the answer to a task given up on: dropped
            if task.assembler is not None:
                raise WireError("a second update header for one task")
            task.assembler = Assembler(header.size, task.limit)
            if task.assembler.add(header.data):
                self._complete(session, task)
        elif kind == "chunk":
            chunk = message.chunk
            if task is None or chunk.task_id != task.task_id:
                return
            if task.assembler is None:
                raise WireError("an update's bytes sent before its header")
            if task.assembler.add(chunk.data):
                self._complete(session, task)
        elif kind == "secagg":
            if session.inbox.full():
                raise WireError(f"more than {INBOX} secure-aggregation messages unread")
            session.inbox.put_nowait(message.secagg)
        elif kind == "error":
            if task is not None and message.error.task_id == task.task_id:
                session.task = None
                task.resolve(Reply(traceback=message.error.traceback[:20_000]
                                   or "training failed (no traceback)"))
        else:
            raise WireError(f"unexpected message {kind!r} in a session")

    def _complete(self, session: Session, task: _Task) -> None:
        session.task = None
        assert task.assembler is not None
        task.resolve(Reply(update=task.assembler.buffer))

    # -- plumbing --------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("sending failed: %s", task.exception())


def _done(reply: Reply) -> asyncio.Future[Reply]:
    future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future
