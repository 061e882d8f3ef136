"""Secure aggregation on the gRPC runtime (``runtime.secure_aggregation``): the server's side
of a round of ``oiafed.secagg.protocol`` over the clients' ``Connect`` streams.

A secure round sends every sampled client its ``TrainTask`` marked ``secure``; after training,
each client runs the protocol's steps through ``SecAgg`` messages (``secagg.messages``) and
answers the task with its masked input instead of its update. Each step waits for the clients
still in the round (until ``step_timeout`` or the round's deadline); a client that
disconnects, fails, times out or breaks the protocol drops out of the round, and the round
fails (``SecureAggregationFailed``, a ``RoundFailed``) when fewer than the threshold remain.
``train`` returns a ``ClientFailure`` for each dropped client, then one ``SecureSum``: the
weighted mean of the survivors' updates, all the server learns of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oiafed import registry
from oiafed.core.types import ClientFailure, ClientTask, Outcome, RoundTask
from oiafed.exceptions import ClientTrainingError, ConfigError, SecureAggregationError
from oiafed.privacy.central import CentralDP
from oiafed.runtime.base import RoundLedger
from oiafed.runtime.envelope import pack_round
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.grpc.service import Reply
from oiafed.runtime.tensors import CHUNK_SIZE
from oiafed.secagg import messages as msg
from oiafed.secagg.protocol import RoundParams, ServerRound
from oiafed.secagg.updates import secure_sum, vector_length

if TYPE_CHECKING:
    from oiafed.config import ExperimentConfig
    from oiafed.runtime.grpc.runtime import GrpcRuntime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureSettings:
    """``runtime.secure_aggregation`` with what the rest of the config implies.

    Attributes:
        threshold: the fewest survivors (None: a majority of the round's clients, >= 2).
        encoding: how clients encode their updates (``weighted`` from the aggregator's
            ``weighted``; ``clip_norm`` from central DP's, whose clients then weigh 1 each).
        step_timeout: seconds a step waits for the clients (None: the round's deadline).
    """

    threshold: int | None
    encoding: msg.Encoding
    step_timeout: float | None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> SecureSettings | None:
        section = cfg.runtime.secure_aggregation
        if section is None:
            return None
        privacy = (registry.build("privacy", cfg.privacy.model_dump(), "privacy")
                   if cfg.privacy is not None else None)
        clip = privacy.clip_norm if isinstance(privacy, CentralDP) else None
        weighted = bool(cfg.aggregator.args.get("weighted", True)) and clip is None
        return cls(section.threshold,
                   msg.Encoding(section.bound, section.precision_bits, weighted, clip),
                   section.step_timeout)

    def threshold_for(self, sampled: int) -> int:
        """The round's threshold for ``sampled`` clients.

        Raises:
            ConfigError: when the configured threshold is above ``sampled`` or it is below 2.
        """
        threshold = self.threshold if self.threshold is not None else max(2, sampled // 2 + 1)
        if not 2 <= threshold <= sampled:
            raise ConfigError(f"secure aggregation needs a threshold in 2..{sampled} (the "
                              f"clients of the round); got {threshold}",
                              "runtime.secure_aggregation.threshold")
        return threshold


async def secure_train(runtime: GrpcRuntime, settings: SecureSettings, task: RoundTask,
                       clients: Sequence[ClientTask], deadline: float | None) -> list[Outcome]:
    """One secure round (module docstring).

    Raises:
        SecureAggregationFailed: when fewer clients than the threshold survive a step.
        ConfigError: for a threshold the round cannot meet.
        ClientTrainingError: in strict mode, when a client's training raised.
    """
    return await _SecureRound(runtime, settings, task, clients, deadline).run()


class _SecureRound:
    """The state of one secure round on the server."""

    def __init__(self, runtime: GrpcRuntime, settings: SecureSettings, task: RoundTask,
                 clients: Sequence[ClientTask], deadline: float | None) -> None:
        self.runtime = runtime
        self.service = runtime._service()
        self.settings = settings
        self.task = task
        self.clients = list(clients)
        self.ids = [c.client_id for c in clients]
        spec = runtime.spec
        self.ledger = RoundLedger(task.round_num, self.ids, deadline,
                                  round_timeout=spec.round_timeout, strict=spec.strict)
        self.params = RoundParams(runtime.session_id, task.round_num,
                                  settings.threshold_for(len(self.ids)),
                                  vector_length(task.weights))
        self.server = ServerRound(self.params, self.ids)
        runtime._next_task += 1
        self.task_id = runtime._next_task
        self.trains: dict[str, asyncio.Future[Reply | None]] = {}
        self.dropped: dict[str, tuple[str, str]] = {}
        """Client id -> why it left the round and the failure kind."""

    async def run(self) -> list[Outcome]:
        try:
            self._send_tasks()
            server = self.server
            for cid, data in (await self._collect(self.ids, msg.ADVERTISE, "advertise keys")).items():
                self._apply(cid, self._advertised, data)
            keys = server.key_list()
            keys_message = msg.encode_keys(self.params, self.settings.encoding, keys)
            await self._send(list(keys), msg.KEYS, lambda _: keys_message)
            for cid, data in (await self._collect(list(keys), msg.SHARES, "share keys")).items():
                self._apply(cid, self._shared, data)
            members = server.sharers()
            await self._send(members, msg.ROUTED,
                             lambda c: msg.encode_ciphertexts(server.routed(c)))
            await self._masked_inputs(members)
            survivors = server.survivors()
            await self._send(survivors, msg.SURVIVORS,
                             lambda _: msg.encode_survivors(survivors))
            for cid, data in (await self._collect(survivors, msg.UNMASK, "unmask")).items():
                self._apply(cid, self._unmasked, data)
            result = secure_sum(server.total(), self.task.weights, self.settings.encoding,
                                survivors)
        finally:
            self._release()
        outcomes: list[Outcome] = [ClientFailure(cid, *self.dropped.get(
            cid, ("dropped out of secure aggregation", "disconnected")))
            for cid in self.ids if cid not in result.members]
        return [*outcomes, result]

    # -- steps -----------------------------------------------------------------------------

    def _send_tasks(self) -> None:
        round_data = pack_round(self.task)
        small = round_data.to_bytes() if round_data.size < CHUNK_SIZE else None
        shared = [] if small is not None else [
            pb.ServerMessage(chunk=pb.Chunk(task_id=self.task_id, data=piece))
            for piece in round_data.pieces(CHUNK_SIZE)]
        while self.ledger.take() is not None:
            pass
        masked_size = 8 * self.params.length + 4096
        for client in self.clients:
            self.trains[client.client_id] = asyncio.ensure_future(self.runtime._train_one(
                self.ledger, self.task_id, round_data.size, small, shared, client, False,
                masked_size))

    async def _masked_inputs(self, members: list[str]) -> None:
        """Wait for the members' masked inputs (their tasks' answers)."""
        waiting = [self.trains[cid] for cid in members]
        if waiting:
            await asyncio.wait(waiting, timeout=self._step_time())
        for cid in members:
            reply = self._reply(cid)
            if reply is None or reply.update is None:
                self._drop_reply(cid, reply, "send its masked input")
                continue
            self._apply(cid, self._masked, reply.update)

    async def _collect(self, cids: list[str], step: int, what: str) -> dict[str, bytes]:
        """Each of ``cids``' ``step`` message (those that sent one in time)."""
        until = self._until()
        found = await asyncio.gather(*(self._next(cid, step, until) for cid in cids))
        got = {}
        for cid, data in zip(cids, found, strict=True):
            if data is None:
                self._drop_reply(cid, self._reply(cid), what)
            else:
                got[cid] = data
        return got

    async def _next(self, cid: str, step: int, until: float | None) -> bytes | None:
        """``cid``'s next message of ``step`` for this task; None when it disconnects, its
        task fails or time runs out. Messages of other tasks or steps (stale or replayed) are
        dropped."""
        session = self.service.sessions.get(cid)
        train = self.trains[cid]
        if session is None:
            return None
        while True:
            getter = asyncio.ensure_future(session.inbox.get())
            ended = asyncio.ensure_future(session.ended.wait())
            waits: set[asyncio.Future[Any]] = {getter, ended}
            if not train.done():
                waits.add(train)
            remaining = None if until is None else max(0.0, until - time.monotonic())
            try:
                done, _ = await asyncio.wait(waits, timeout=remaining,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                if not getter.done():
                    getter.cancel()
            if getter in done:
                message = getter.result()
                if message.task_id == self.task_id and message.step == step:
                    return message.data
                logger.warning("round %d: %s sent a secure-aggregation message of task %d "
                               "step %d while step %d of task %d was awaited: dropped "
                               "(replayed or stale)", self.task.round_num, cid,
                               message.task_id, message.step, step, self.task_id)
                continue
            if train in done:
                reply = train.result()
                if reply is None or reply.update is None:
                    return None
                continue  # the masked input came: keep waiting for the step
            return None

    async def _send(self, cids: list[str], step: int, data: Callable[[str], bytes]) -> None:
        async def one(cid: str) -> None:
            session = self.service.sessions.get(cid)
            if session is not None:
                message = pb.ServerMessage(secagg=pb.SecAgg(
                    task_id=self.task_id, round=self.task.round_num, step=step, data=data(cid)))
                with contextlib.suppress(Exception):  # a dead client misses the next step
                    await session.send([message])

        await asyncio.gather(*(one(cid) for cid in cids))

    # -- plumbing --------------------------------------------------------------------------

    def _advertised(self, cid: str, data: bytes | bytearray) -> None:
        self.server.advertised(cid, msg.decode_advertise(bytes(data)))

    def _shared(self, cid: str, data: bytes | bytearray) -> None:
        self.server.shared(cid, msg.decode_ciphertexts(bytes(data)))

    def _masked(self, cid: str, data: bytes | bytearray) -> None:
        self.server.masked_input(cid, msg.decode_masked(data, self.params, cid))

    def _unmasked(self, cid: str, data: bytes | bytearray) -> None:
        self.server.unmasked(cid, msg.decode_unmask(bytes(data)))

    def _apply(self, cid: str, record: Callable[[str, bytes | bytearray], None],
               data: bytes | bytearray) -> None:
        """``record`` (decode and take) ``cid``'s message ``data``; a bad one drops ``cid``."""
        try:
            record(cid, data)
        except SecureAggregationError as exc:
            logger.warning("round %d: %s broke the secure-aggregation protocol: %s",
                           self.task.round_num, cid, exc)
            self.dropped[cid] = (f"broke the secure-aggregation protocol: {exc}", "malformed")

    def _reply(self, cid: str) -> Reply | None:
        """``cid``'s answer to its task, if it came."""
        future = self.trains[cid]
        return future.result() if future.done() and not future.cancelled() else None

    def _drop_reply(self, cid: str, reply: Reply | None, what: str) -> None:
        if cid in self.dropped:
            return
        if reply is not None and reply.traceback:
            if self.ledger.strict:
                raise ClientTrainingError(cid, self.task.round_num, reply.traceback)
            self.dropped[cid] = (reply.traceback, "raised")
        elif reply is not None and reply.failure:
            self.dropped[cid] = (reply.failure, reply.kind or "failed")
        else:
            self.dropped[cid] = (f"did not {what} in time (secure aggregation)", "timeout")
        logger.warning("round %d: %s dropped out of secure aggregation: %s",
                       self.task.round_num, cid, self.dropped[cid][0].strip().splitlines()[-1])

    def _until(self) -> float | None:
        step = self.settings.step_timeout
        limits = [t for t in (self.ledger.deadline,
                              None if step is None else time.monotonic() + step) if t is not None]
        return min(limits) if limits else None

    def _step_time(self) -> float | None:
        until = self._until()
        return None if until is None else max(0.0, until - time.monotonic())

    def _release(self) -> None:
        """Free every client still holding this round's task (the round is over)."""
        for cid, future in self.trains.items():
            if not future.done():
                session = self.service.sessions.get(cid)
                if session is not None and session.task is not None \
                        and session.task.task_id == self.task_id:
                    session.fail("the secure round ended without it", "timeout")
                future.cancel()


