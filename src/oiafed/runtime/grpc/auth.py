"""Who may join a deployment, and as which client: per-client tokens, TLS material.

Each client has its own token, which the server operator derives from the server's secret
(``client_token``: HMAC-SHA256 of the client id keyed by the secret; ``oiafed token ID`` prints
it). The server holds the secret (``--secret-file`` or ``$OIAFED_SECRET``), a client its token
(``--token-file`` or ``$OIAFED_TOKEN``); tokens are required by default. A client's calls carry
its id and token in the metadata (``oiafed-client-id``, ``authorization: Bearer <token>``); a
server interceptor recomputes the token of that id and compares in constant time
(``hmac.compare_digest``) before the call reaches the federation, whose Hello must then name
the same id. TLS encrypts the connection; with a client CA on the server (mutual TLS) a client
needs a certificate from that CA naming its id (subject CN or a SAN). Without TLS the token
crosses the network in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from oiafed.exceptions import InputError
from oiafed.runtime.grpc.logs import LogThrottle

logger = logging.getLogger(__name__)

TOKEN_ENV = "OIAFED_TOKEN"
SECRET_ENV = "OIAFED_SECRET"
METADATA_KEY = "authorization"
CLIENT_ID_KEY = "oiafed-client-id"
SCHEME = "Bearer "
MIN_SECRET = 32
"""The fewest characters of a server secret: a client's token must not let it be guessed."""


def client_token(secret: str, client_id: str) -> str:
    """The token of ``client_id``: HMAC-SHA256 of the id keyed by the server's ``secret``, in
    hex (``printf %s ID | openssl dgst -sha256 -hmac SECRET`` computes the same)."""
    return hmac.new(secret.encode("utf-8"), client_id.encode("utf-8"), hashlib.sha256).hexdigest()


def _file_or_env(file: str | Path | None, env: str, what: str) -> str | None:
    """The stripped text of ``file`` if given, else of ``$env`` (None when unset or blank).

    Raises:
        InputError: when the file cannot be read or is empty.
    """
    if file is None:
        return os.environ.get(env, "").strip() or None
    path = Path(file).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the {what} file {path}: {exc}") from exc
    if not text:
        raise InputError(f"the {what} file {path} is empty")
    return text


def read_token(token_file: str | Path | None = None, *, required: bool = True) -> str | None:
    """A client's own token: from ``token_file`` if given, else ``$OIAFED_TOKEN``.

    Raises:
        InputError: when the file cannot be read or is empty, or no token is found while
            ``required``.
    """
    token = _file_or_env(token_file, TOKEN_ENV, "token")
    if token is None and required:
        raise InputError(
            f"no token: the client needs its own token (oiafed token CLIENT_ID, where the "
            f"server's secret is) in ${TOKEN_ENV} or a file given with --token-file (or "
            "--no-token, for a server run with --no-token)")
    return token


def read_secret(secret_file: str | Path | None = None, *, required: bool = True) -> str | None:
    """The server's secret, which each client's token derives from: from ``secret_file`` if
    given, else ``$OIAFED_SECRET``.

    Raises:
        InputError: when the file cannot be read or is empty, or no secret is found while
            ``required``.
    """
    secret = _file_or_env(secret_file, SECRET_ENV, "secret")
    if secret is None and required:
        raise InputError(
            f"no secret: the server needs the secret that clients' tokens derive from in "
            f"${SECRET_ENV} or a file given with --secret-file (or --no-token to run without "
            "tokens: anyone who reaches the port joins, as any client)")
    return secret


def _read(path: str | Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    try:
        return file.read_bytes()
    except OSError as exc:
        raise InputError(f"{flag}: cannot read {file}: {exc.strerror or exc}") from exc


@dataclass
class ServerSecurity:
    """The server's side: the secret clients' tokens derive from, and its TLS material.

    Attributes:
        secret: each client presents ``client_token(secret, its id)`` (None: no token is asked
            for; only with ``require_token`` False).
        require_token: refuse to start without a secret (the default).
        tls_cert, tls_key: PEM files of the server's certificate chain and private key.
        tls_client_ca: PEM file of the CA that signs client certificates; setting it turns on
            mutual TLS (clients without a valid certificate naming their id are refused).
    """

    secret: str | None = None
    require_token: bool = True
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None

    @classmethod
    def from_options(cls, *, secret_file: str | Path | None = None, no_token: bool = False,
                     tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                     tls_client_ca: str | Path | None = None) -> ServerSecurity:
        """From command-line options (the secret from ``secret_file`` or ``$OIAFED_SECRET``)."""
        secret = None if no_token else read_secret(secret_file)
        security = cls(secret, not no_token, tls_cert, tls_key, tls_client_ca)
        security.check()
        return security

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> None:
        """Raise ``InputError`` on an inconsistent combination."""
        if self.require_token and not self.secret:
            raise InputError(f"no secret: set ${SECRET_ENV} or --secret-file (or --no-token)")
        if self.secret is not None and len(self.secret) < MIN_SECRET:
            raise InputError(
                f"the secret has {len(self.secret)} characters, fewer than {MIN_SECRET}: a "
                "client's token would let it be guessed (make one: openssl rand -hex 32)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InputError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and not self.tls:
            raise InputError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    def credentials(self) -> grpc.ServerCredentials | None:
        """The server's TLS credentials (None: plaintext)."""
        if not self.tls:
            return None
        client_ca = _read(self.tls_client_ca, "--tls-client-ca")
        return grpc.ssl_server_credentials(
            [(_read(self.tls_key, "--tls-key"), _read(self.tls_cert, "--tls-cert"))],
            root_certificates=client_ca, require_client_auth=client_ca is not None,
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self.secret)] if self.secret else []

    def identity_refusal(self, client_id: str, context: grpc.aio.ServicerContext) -> str | None:
        """Why the call of ``context`` may not act as ``client_id`` (None: it may): its token
        (checked by the interceptor) must be ``client_id``'s, and with mutual TLS its
        certificate must name ``client_id``."""
        if self.secret:
            claimed = _metadata_value(context.invocation_metadata(), CLIENT_ID_KEY)
            if claimed != client_id:
                return f"the Hello says {client_id!r} but the token is {claimed!r}'s"
        if self.tls_client_ca is not None:
            names = certificate_names(context.auth_context())
            if client_id not in names:
                return (f"the client certificate names {', '.join(map(repr, names)) or 'nothing'}"
                        f", not {client_id!r}: with mutual TLS a client's certificate must name "
                        "its client id (its subject's common name or a subject alternative name)")
        return None


@dataclass
class ClientSecurity:
    """The client's side: the token it presents and its TLS material.

    Attributes:
        token: this client's own token, ``client_token(secret, client id)`` (None: none is
            sent).
        tls_ca: PEM file of the CA that signed the server's certificate; setting it turns on TLS.
        tls_cert, tls_key: the client's certificate and key, for mutual TLS.
        tls_server_name: the name to expect in the server's certificate, when it differs from
            the host dialled.
    """

    token: str | None = None
    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_server_name: str | None = None

    @classmethod
    def from_options(cls, *, token_file: str | Path | None = None, no_token: bool = False,
                     tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                     tls_key: str | Path | None = None,
                     tls_server_name: str | None = None) -> ClientSecurity:
        token = None if no_token else read_token(token_file)
        security = cls(token, tls_ca, tls_cert, tls_key, tls_server_name)
        security.check()
        return security

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InputError("--tls-cert and --tls-key go together")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel's TLS credentials (None: plaintext). Without ``tls_ca`` the system's
        root certificates verify the server."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca"),
            private_key=_read(self.tls_key, "--tls-key"),
            certificate_chain=_read(self.tls_cert, "--tls-cert"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.tls_server_name:
            return [("grpc.ssl_target_name_override", self.tls_server_name)]
        return []

    def metadata(self, client_id: str) -> list[tuple[str, str]]:
        """The call metadata of ``client_id``: its id and token (nothing without a token)."""
        if not self.token:
            return []
        return [(CLIENT_ID_KEY, client_id), (METADATA_KEY, SCHEME + self.token)]


def _metadata_value(metadata: Any, key: str) -> str | None:
    """The last value of ``key`` in call ``metadata`` (None: absent)."""
    found = None
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            found = value
    return found


def token_matches(metadata: Any, secret: str) -> bool:
    """Whether the call ``metadata`` carries the token of the client id it names (compared
    in constant time)."""
    client_id = _metadata_value(metadata, CLIENT_ID_KEY)
    authorization = _metadata_value(metadata, METADATA_KEY) or ""
    if client_id is None or not authorization.startswith(SCHEME):
        return False
    return hmac.compare_digest(authorization[len(SCHEME):].encode("utf-8"),
                               client_token(secret, client_id).encode("utf-8"))


def certificate_names(auth_context: Mapping[str, Sequence[bytes]]) -> list[str]:
    """The names a peer's certificate vouches for: its subject's common name and its subject
    alternative names (from ``ServicerContext.auth_context()``)."""
    values = [*auth_context.get("x509_common_name", ()),
              *auth_context.get("x509_subject_alternative_name", ())]
    return list(dict.fromkeys(value.decode("utf-8", "replace") for value in values))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends with ``UNAUTHENTICATED`` every call whose metadata lacks the token of the client id
    it names (``client_token(secret, id)``)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        throttle = LogThrottle(logger)

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            throttle.warning("token", "refused a connection from %s: missing or wrong token",
                             context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: the server did not accept this client")

        self._refuse = grpc.stream_stream_rpc_method_handler(refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if token_matches(handler_call_details.invocation_metadata, self.secret):
            return await continuation(handler_call_details)
        return self._refuse
