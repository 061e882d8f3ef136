"""Why a client cannot connect when retrying cannot help: TLS set up differently at the two ends.

gRPC reports every failed connection as ``UNAVAILABLE``. Most are worth retrying (the server is
not up yet, the network dropped), but a TLS mismatch is a configuration error that no retry
mends. ``tls_mistake`` names it from gRPC's error text (the server's certificate names another
host, is signed by another CA, or the server does not speak TLS), and, where the server only
closed the socket, from a TLS handshake of its own (``_probe``): a plaintext client at a TLS
server, and a mutual-TLS server refusing this client's certificate, look alike to gRPC
("Socket closed"), but a TLS server answers a handshake, and one that refuses the client's
certificate closes the connection right after it, where one that accepts it sends its first
HTTP/2 frame. The probe sends no token and no request.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

from oiafed.runtime.grpc.auth import ClientSecurity
from oiafed.runtime.grpc.wire import parse_address

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
"""Seconds the probe waits to connect, for the handshake and for the server's first frame."""

_NAME_MISMATCH = ("hostname verification", "not in peer certificate", "no match found for server name")
_HANDSHAKE = ("handshake failed", "ssl_error", "tsi_")  # not "ssl": a host may be named so


def tls_mistake(server: str, details: str, security: ClientSecurity,
                timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why connecting to ``server`` (``HOST:PORT``) failed for good, given gRPC's ``details``
    of an ``UNAVAILABLE`` error; None when it may work on a retry."""
    text = details.lower()
    if any(words in text for words in _NAME_MISMATCH):
        host = parse_address(server)[0]
        name, source = ((security.tls_server_name, "--tls-server-name") if security.tls_server_name
                        else (host, "the host dialled"))
        return (f"the certificate of the server {server} does not name {name} ({source}): dial "
                "a name it holds, or give that name with --tls-server-name")
    if security.tls and "wrong_version_number" in text:
        return (f"the server {server} does not speak TLS, but this client does (--tls-ca, "
                "--tls-cert): leave them out, or start the server with --tls-cert and --tls-key")
    if security.tls and "certificate_verify_failed" in text:
        return (f"cannot verify the certificate of the server {server}: --tls-ca must be the CA "
                f"that signed it ({details.strip()})")
    if security.tls and any(words in text for words in _HANDSHAKE):
        return f"the TLS handshake with the server {server} failed: {details.strip()}"
    if "socket closed" in text:
        return _probe(server, security, timeout)
    return None


def _probe(server: str, security: ClientSecurity, timeout: float) -> str | None:
    """Why the server closed the connection, from a handshake of our own (None: not a TLS
    mismatch, or the probe could not tell)."""
    host, port = parse_address(server)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # gRPC checked the server: the probe only asks about us
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    alert = ""
    try:
        if security.tls_cert is not None and security.tls_key is not None:
            context.load_cert_chain(Path(security.tls_cert).expanduser(),
                                    Path(security.tls_key).expanduser())
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=security.tls_server_name or host) as tls:
            if security.tls and tls.recv(1):  # the server's first HTTP/2 frame: it accepted us
                return None
    except ssl.SSLError as exc:
        if "ALERT" not in str(exc.reason):  # not an answer in TLS
            logger.debug("TLS probe of %s: %s", server, exc)
            return None
        alert = f" ({exc.reason})"
    except (OSError, ValueError) as exc:
        logger.debug("TLS probe of %s: %s", server, exc)
        return None
    if not security.tls:
        return (f"the server {server} uses TLS, but this client connects in plaintext: give "
                "--tls-ca (the CA of the server's certificate), and --tls-cert and --tls-key if "
                "the server asks for client certificates (mutual TLS)")
    if security.tls_cert is None:
        return (f"the server {server} requires a client certificate (mutual TLS) and closed the "
                f"connection{alert}: give --tls-cert and --tls-key")
    return (f"the server {server} refused this client's certificate ({security.tls_cert}) and "
            f"closed the connection{alert}: it must be signed by the CA the server trusts "
            "(--tls-client-ca) and be valid now")
