"""A client's side of a secure round (``runtime.secure_aggregation``): after training a
``secure`` task it answers the server's ``SecAgg`` steps (``oiafed.secagg.messages``) with
``oiafed.secagg.protocol.ClientRound`` and sends its masked input as the task's update."""

from __future__ import annotations

import logging

from oiafed.core.types import ClientUpdate, Weights
from oiafed.exceptions import SecureAggregationError
from oiafed.runtime.grpc.proto import oiafed_pb2 as pb
from oiafed.runtime.tensors import CHUNK_SIZE, Payload
from oiafed.secagg import messages as msg
from oiafed.secagg.protocol import ClientRound
from oiafed.secagg.updates import client_input

logger = logging.getLogger(__name__)


def update_messages(task_id: int, payload: Payload) -> list[pb.ClientMessage]:
    """``payload`` as a task's answer: its header (holding it whole when it fits one chunk),
    then its chunks."""
    pieces = payload.pieces(CHUNK_SIZE)
    single = len(pieces) == 1
    out = [pb.ClientMessage(update=pb.UpdateHeader(task_id=task_id, size=payload.size,
                                                   data=pieces[0] if single else b""))]
    if not single:
        out += [pb.ClientMessage(chunk=pb.Chunk(task_id=task_id, data=p)) for p in pieces]
    return out


class SecureTask:
    """One secure task of one client, from its trained ``update`` and the round's
    ``global_weights`` to its unmasking shares."""

    def __init__(self, task: pb.TrainTask, client_id: str, update: ClientUpdate,
                 global_weights: Weights) -> None:
        self.task_id = task.task_id
        self.round_num = task.round
        self.client_id = client_id
        self.update = update
        self.global_weights = global_weights
        self.protocol = ClientRound(client_id, task.round)
        self.encoding: msg.Encoding | None = None
        self.finished = False

    def start(self) -> list[pb.ClientMessage]:
        """Step 1: advertise this round's public keys."""
        return [self._message(msg.ADVERTISE, msg.encode_advertise(self.protocol.advertise()))]

    def answer(self, message: pb.SecAgg) -> list[pb.ClientMessage]:
        """What to send for the server's ``message``.

        Raises:
            SecureAggregationError: for a message of another task or round (replayed), out
                of order, malformed, or a share that fails authentication.
        """
        if message.task_id != self.task_id or message.round != self.round_num:
            raise SecureAggregationError(f"a message of round {message.round} in round "
                                         f"{self.round_num} (replayed or stale)")
        if message.step == msg.KEYS:
            params, self.encoding, keys = msg.decode_keys(message.data)
            return [self._message(msg.SHARES, msg.encode_ciphertexts(
                self.protocol.share_keys(params, keys)))]
        if message.step == msg.ROUTED:
            if self.encoding is None:
                raise SecureAggregationError("shares before keys")
            x = client_input(self.update, self.global_weights, self.encoding)
            y = self.protocol.masked_input(msg.decode_ciphertexts(message.data), x)
            return update_messages(self.task_id, msg.encode_masked(
                self.protocol.round_params(), self.client_id, y))
        if message.step == msg.SURVIVORS:
            shares = self.protocol.unmask(msg.decode_survivors(message.data))
            self.finished = True
            return [self._message(msg.UNMASK, msg.encode_unmask(shares))]
        raise SecureAggregationError(f"unknown secure-aggregation step {message.step}")

    def _message(self, step: int, data: bytes) -> pb.ClientMessage:
        return pb.ClientMessage(secagg=pb.SecAgg(task_id=self.task_id, round=self.round_num,
                                                 step=step, data=data))
