"""Inside a worker process of the parallel runtime (the driver is ``driver.py``).

The pipe carries messages of two raw frames (``Connection.send_bytes``): a JSON header and a
payload of ``envelope`` bytes (or nothing). Nothing is pickled. Driver to worker: ``init``
(the config), ``round`` (the round's envelope, once per round), ``train`` (a client's
envelope), ``revoke`` (a queued client another worker took), ``stop``. Worker to driver:
``ready``, ``fatal`` (it could not start), ``update`` (its envelope), ``error`` (the
traceback of the training that raised), ``skipped`` (a revoked client).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import torch

from oiafed.config import ExperimentConfig
from oiafed.runtime.codec import decode_json, encode_json
from oiafed.runtime.processes import ProcessSetup
from oiafed.runtime.worker import ClientWorker

SEND_BUFFER = 8 * 2**20
"""Bytes of socket send buffer a worker asks for (the system caps it: net.core.wmem_max)."""

Message = tuple[dict[str, Any], bytes]


def send(conn: Connection, header: dict[str, Any], payload: bytes = b"") -> None:
    """One message: its JSON header, then its payload."""
    conn.send_bytes(encode_json(header))
    conn.send_bytes(payload)


def receive(conn: Connection) -> Message:
    """One message sent by ``send``."""
    header = decode_json(conn.recv_bytes())
    return header, conn.recv_bytes()


def _widen_send_buffer(conn: Connection) -> None:
    """Let an update fit in the kernel's buffer (as far as the system allows), so the worker
    goes on to its next client without waiting for the driver to read the last one."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _take_revoke(inbox: deque[Message], cid: str, round_num: int) -> bool:
    """Whether ``inbox`` revokes ``cid`` in ``round_num`` (the revoke is then removed)."""
    wanted = {"op": "revoke", "client_id": cid, "round": round_num}
    for message in inbox:
        if message[0] == wanted:
            inbox.remove(message)
            return True
    return False


def worker_main(conn: Connection) -> None:
    """A worker process: build a ``ClientWorker`` from the config, then train clients on
    request until told to stop or the driver goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops us
    try:
        init, _ = receive(conn)
        ProcessSetup(tuple(init["sys_path"]), init["cwd"]).apply()
        torch.set_num_threads(int(init.get("threads") or 1))
        worker = ClientWorker.from_config(ExperimentConfig.model_validate(init["config"]),
                                          device=init.get("device"))
    except EOFError:
        return
    except Exception as exc:
        send(conn, {"op": "fatal", "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()})
        return
    send(conn, {"op": "ready", "pid": os.getpid()})
    _widen_send_buffer(conn)
    inbox: deque[Message] = deque()  # read ahead, not yet acted on
    round_data, round_num = b"", 0
    try:
        while True:
            header, payload = inbox.popleft() if inbox else receive(conn)
            op = header.get("op")
            if op == "stop":
                return
            if op == "round":
                round_data, round_num = payload, int(header["round"])
            elif op == "train":
                cid = header["client_id"]
                while conn.poll():
                    inbox.append(receive(conn))
                if _take_revoke(inbox, cid, round_num):  # another worker has it now
                    send(conn, {"op": "skipped", "client_id": cid, "round": round_num})
                    continue
                reply = worker.execute(round_data, payload)
                about = {"client_id": cid, "round": round_num}
                if reply.update is None:
                    send(conn, {"op": "error", **about, "traceback": reply.traceback})
                else:
                    send(conn, {"op": "update", **about}, reply.update.to_bytes())
    except (EOFError, OSError):
        return  # the driver is gone
    finally:
        worker.close()
