"""The client side of a deployment: a process that joins the server and trains when asked.

``FederationClient`` holds the ``Connect`` stream (see ``proto/oiafed.proto``): it says Hello,
receives tasks (the round's and its own envelope, in chunks), hands their bytes to the worker's
entry point (``ClientWorker.execute``) and sends back the update's envelope in chunks, or the
traceback of training that raised (or, for a task declared over ``max_task_bytes``, why it was
not trained: nothing is allocated for it). A dropped connection is retried (with back-off) until the server
says the run is over, or until it has been unreachable for ``reconnect_timeout`` seconds. A
refusal (wrong token, a certificate for another id, unknown client id, another model) is final;
one because the id is already connected is retried for ``duplicate_wait`` seconds. TLS set up
differently at the two ends (plaintext against TLS, a client certificate refused, a server
certificate for another name: ``diagnose.tls_mistake``) is final from the first attempt.

``run_client`` builds the ``ClientWorker`` from the config: the configured learner and
callbacks (epoch hooks run in this process), trained on this client's partition, computed from
the seed exactly as the server computes it, or on a local dataset (``local_data``).
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from oiafed.config import ExperimentConfig
from oiafed.exceptions import (
    InputError,
    RefusedError,
    SecureAggregationError,
    ServerUnreachable,
    WireError,
)
from oiafed.runtime.envelope import PROTOCOL, decode_round, decode_update
from oiafed.runtime.grpc.auth import ClientSecurity
from oiafed.runtime.grpc.diagnose import tls_mistake
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.proto import oiafed_pb2_grpc as pb_grpc
from oiafed.runtime.grpc.secure_client import SecureTask, update_messages
from oiafed.runtime.grpc.wire import CLIENT_OPTIONS, model_digest, parse_address
from oiafed.runtime.tensors import Assembler
from oiafed.runtime.worker import ClientWorker, TaskReply

logger = logging.getLogger(__name__)

MAX_TASK_BYTES = 1 << 32
"""The largest task a client accepts by default, in bytes (``runtime.max_task_bytes``)."""

REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
DUPLICATE_WAIT = 45.0
"""Seconds a client refused because its id is already connected keeps trying: the server
drops a connection that died without closing within 30 s (keepalive, ``wire.KEEPALIVE``), so a
client restarted after such a death gets in; a second process for a live one gives up."""


Execute = Callable[[memoryview, bytes], TaskReply]
"""The worker's entry point: the round's and the client's envelope bytes in, a reply out."""


@dataclass
class Finished:
    """How the run ended, as the server said."""

    ok: bool
    reason: str


class _Dropped(Exception):
    """The connection ended after the server had welcomed us (retry)."""


class FederationClient:
    """Joins ``server`` as ``client_id`` and runs ``execute`` for every task it is sent.

    Args:
        server: ``HOST:PORT`` of the server.
        client_id: this client's id (``client_3``).
        execute: the worker's entry point (``ClientWorker.execute``): task bytes in, the
            update's bytes or the traceback of training that raised out.
        security: token and TLS material.
        digest: the model digest the server checks (``wire.model_digest(cfg)``).
        reconnect_timeout: give up after this many seconds without a connection.
        duplicate_wait: give up after this many seconds of refusals because ``client_id`` is
            already connected.
        max_task_bytes: a task declared larger is answered with an error, never allocated.
    """

    def __init__(self, server: str, client_id: str, execute: Execute,
                 security: ClientSecurity, *, digest: str = "",
                 reconnect_timeout: float = 300.0,
                 duplicate_wait: float = DUPLICATE_WAIT,
                 max_task_bytes: int = MAX_TASK_BYTES) -> None:
        parse_address(server, "--server")
        self.server = server
        self.client_id = client_id
        self.execute = execute
        self.security = security
        self.digest = digest
        self.reconnect_timeout = reconnect_timeout
        self.duplicate_wait = duplicate_wait
        self.max_task_bytes = max_task_bytes
        self.connections = 0

    def run(self) -> Finished:
        """Serve tasks until the server ends the run.

        Raises:
            RefusedError: when the server refuses this client.
            ServerUnreachable: when no connection could be made for ``reconnect_timeout``.
        """
        last_seen = time.monotonic()
        delay, last_error = 0.1, ""
        duplicate_since: float | None = None
        while True:
            try:
                return self._session()
            except _Dropped as exc:
                logger.warning("connection to %s lost (%s); reconnecting", self.server, exc)
                last_seen, delay, duplicate_since = time.monotonic(), 0.1, None
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                refusal = f"the server {self.server} refused {self.client_id}: {details} ({code.name})"
                if code in REFUSALS:
                    raise RefusedError(refusal) from None
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    last_seen = time.monotonic()  # the server answered
                    if duplicate_since is None:
                        duplicate_since = last_seen
                        logger.warning("%s; trying again for up to %gs", refusal,
                                       self.duplicate_wait)
                    if last_seen - duplicate_since >= self.duplicate_wait:
                        raise RefusedError(refusal) from None
                elif code == grpc.StatusCode.UNAVAILABLE and (
                        mistake := tls_mistake(self.server, details, self.security)):
                    raise RefusedError(mistake) from None
                else:
                    logger.debug("cannot reach %s: %s %s", self.server, code.name, details)
                    last_error = f"{code.name}: {details}"
            if time.monotonic() - last_seen > self.reconnect_timeout:
                hint = ""
                if "socket closed" in last_error.lower():
                    hint = ("; the server took the connection and closed it: does it use TLS "
                            "(--tls-ca) or mutual TLS (--tls-cert, --tls-key)?")
                raise ServerUnreachable(
                    f"could not reach the server {self.server} for {self.reconnect_timeout:g}s "
                    f"(last error: {last_error or 'none'}){hint}")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _channel(self) -> grpc.Channel:
        options = [*CLIENT_OPTIONS, *self.security.channel_options()]
        credentials = self.security.credentials()
        if credentials is None:
            return grpc.insecure_channel(self.server, options=options)
        return grpc.secure_channel(self.server, credentials, options=options)

    def _session(self) -> Finished:
        outbox: queue.SimpleQueue[pb.ClientMessage | None] = queue.SimpleQueue()
        outbox.put(pb.ClientMessage(hello=pb.Hello(client_id=self.client_id, protocol=PROTOCOL,
                                                   model_digest=self.digest, pid=os.getpid())))

        def requests() -> Iterator[pb.ClientMessage]:
            while (message := outbox.get()) is not None:
                yield message

        channel = self._channel()
        call = pb_grpc.FederationStub(channel).Connect(
            requests(), metadata=self.security.metadata(self.client_id))
        try:
            first = next(call)  # grpc.RpcError when refused or unreachable
            if first.WhichOneof("kind") != "welcome":
                raise RefusedError(f"the server {self.server} did not welcome the client")
            self.connections += 1
            logger.info("joined %s as %s", self.server, self.client_id)
            try:
                return self._serve(call, outbox)
            except grpc.RpcError as exc:
                raise _Dropped(f"{exc.code().name}: {exc.details()}") from None
        except StopIteration:
            raise _Dropped("the server closed the connection") from None
        except WireError as exc:
            raise _Dropped(f"malformed message from the server: {exc}") from None
        finally:
            outbox.put(None)
            call.cancel()
            channel.close()

    def _serve(self, call: Iterator[pb.ServerMessage],
               outbox: queue.SimpleQueue[pb.ClientMessage | None]) -> Finished:
        task: pb.TrainTask | None = None
        assembler: Assembler | None = None
        secure: SecureTask | None = None
        for message in call:
            kind = message.WhichOneof("kind")
            if kind == "task":
                task, assembler, secure = message.task, None, None
                if task.size > self.max_task_bytes:  # answered before anything is allocated
                    self._refuse(task, outbox)
                    task = None  # its chunks are skipped
                    continue
                assembler = Assembler(task.size, self.max_task_bytes)
                if assembler.add(task.data):
                    secure = self._answer(task, assembler, outbox)
                    task = assembler = None
            elif kind == "chunk":
                if task is None or assembler is None or message.chunk.task_id != task.task_id:
                    continue
                if assembler.add(message.chunk.data):
                    secure = self._answer(task, assembler, outbox)
                    task = assembler = None
            elif kind == "secagg":
                secure = self._secure_step(secure, message.secagg, outbox)
            elif kind == "finish":
                outbox.put(None)  # half-close: the server sees the end of our stream
                for _ in call:
                    pass
                return Finished(message.finish.ok, message.finish.reason)
        raise _Dropped("the server ended the stream without finishing the run")

    def _refuse(self, task: pb.TrainTask,
                outbox: queue.SimpleQueue[pb.ClientMessage | None]) -> None:
        """Answer ``task`` with why it is not trained: it is larger than ``max_task_bytes``."""
        reason = (f"a task of {task.size} bytes is over this client's limit "
                  f"runtime.max_task_bytes={self.max_task_bytes}")
        logger.error("round %d: %s", task.round, reason)
        outbox.put(pb.ClientMessage(error=pb.TaskError(task_id=task.task_id, traceback=reason)))

    def _secure_step(self, secure: SecureTask | None, message: pb.SecAgg,
                     outbox: queue.SimpleQueue[pb.ClientMessage | None]) -> SecureTask | None:
        """Answer a step of secure aggregation; the task that goes on (None once it ends)."""
        if secure is None:
            logger.warning("a secure-aggregation message of round %d with no secure task: "
                           "dropped", message.round)
            return None
        try:
            replies = secure.answer(message)
        except SecureAggregationError as exc:
            logger.error("round %d: secure aggregation: %s", secure.round_num, exc)
            if message.task_id != secure.task_id:
                return secure  # a stale message does not end the task in progress
            outbox.put(pb.ClientMessage(error=pb.TaskError(
                task_id=secure.task_id, traceback=f"secure aggregation: {exc}")))
            return None
        for reply in replies:
            outbox.put(reply)
        return None if secure.finished else secure

    def _answer(self, task: pb.TrainTask, assembler: Assembler,
                outbox: queue.SimpleQueue[pb.ClientMessage | None]) -> SecureTask | None:
        """Train ``task`` and send its update, or, for a secure task, start secure
        aggregation (its state returned)."""
        payload = memoryview(assembler.buffer)
        if task.round_size > len(payload):
            raise WireError(f"a task of {len(payload)} bytes says its round part has "
                            f"{task.round_size}")
        # the round's part is read in place; the client's (small, maybe unaligned) is copied
        reply = self.execute(payload[:task.round_size], bytes(payload[task.round_size:]))
        if reply.update is None:
            logger.error("round %d: training failed:\n%s", task.round, reply.traceback)
            outbox.put(pb.ClientMessage(error=pb.TaskError(task_id=task.task_id,
                                                           traceback=reply.traceback)))
            return None
        if task.secure:
            secure = SecureTask(task, self.client_id, decode_update(reply.update.to_bytes()),
                                decode_round(payload[:task.round_size]).weights)
            for message in secure.start():
                outbox.put(message)
            return secure
        for message in update_messages(task.task_id, reply.update):
            outbox.put(message)
        return None


def build_worker(cfg: ExperimentConfig, client_id: str, *, local_data: bool = False
                 ) -> ClientWorker:
    """The ``ClientWorker`` of ``client_id``: the configured learner (and callbacks) on the
    client's partition of the configured data, or, with ``local_data``, on the whole
    configured dataset (a local one, e.g. ``data.type=mnist data.args.root=/data/site3``).

    Raises:
        InputError: for a client id the config does not have, or a dataset that cannot serve
            as local data.
    """
    worker = ClientWorker.from_config(cfg, local_data=local_data)
    if worker.data is not None:
        try:
            worker.data.index_of(client_id)
        except (KeyError, ValueError, IndexError):
            ids = worker.data.client_ids
            raise InputError(f"unknown client id {client_id!r}: the config has {ids[0]} .. "
                             f"{ids[-1]} ({len(ids)} clients)") from None
    return worker


def run_client(cfg: ExperimentConfig, *, server: str, client_id: str, security: ClientSecurity,
               local_data: bool = False, threads: int | None = None,
               reconnect_timeout: float = 300.0) -> Finished:
    """Join ``server`` as ``client_id`` and train until the run is over (``oiafed client``)."""
    if threads is not None:
        torch.set_num_threads(threads)
    worker = build_worker(cfg, client_id, local_data=local_data)
    client = FederationClient(server, client_id, worker.execute, security,
                              digest=model_digest(cfg), reconnect_timeout=reconnect_timeout,
                              max_task_bytes=cfg.runtime.max_task_bytes)
    logger.info("%s: connecting to %s", client_id, server)
    try:
        return client.run()
    finally:
        worker.close()
