"""What both ends of the wire share: channel options, digests, addresses (the protocol version
is the envelope's, ``envelope.PROTOCOL``)."""

from __future__ import annotations

import hashlib
import json

from oiafed.config import ExperimentConfig
from oiafed.exceptions import InputError

MAX_MESSAGE = 4 << 20
"""The largest single message either side accepts."""

KEEPALIVE = [
    # Pings find a peer that vanished without closing its connection (a machine that lost
    # power or its network) within about keepalive_time + keepalive_timeout.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),  # else a ping goes unanswered for a minute
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS = [
    *KEEPALIVE,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]

CLIENT_OPTIONS = [
    *KEEPALIVE,
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def model_digest(cfg: ExperimentConfig) -> str:
    """A digest of the model section: server and clients must build the same model."""
    section = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(section.encode("utf-8")).hexdigest()


def parse_address(address: str, flag: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) split and checked.

    Raises:
        InputError: when it is not of that form.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InputError(f"{flag} must look like HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
