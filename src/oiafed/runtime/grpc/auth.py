"""Who may join a deployment: the shared token and TLS material of servers and clients.

The token is required by default. It comes from a token file (``--token-file``) or the
``OIAFED_TOKEN`` environment variable, travels in the call metadata
(``authorization: Bearer <token>``) and is compared in constant time
(``hmac.compare_digest``) by a server interceptor, before the call reaches the federation.
TLS encrypts the connection (and, with a client CA on the server, authenticates clients by
certificate: mutual TLS). Without TLS the token crosses the network in clear.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from oiafed.exceptions import InputError

logger = logging.getLogger(__name__)

TOKEN_ENV = "OIAFED_TOKEN"
METADATA_KEY = "authorization"
SCHEME = "Bearer "


def read_token(token_file: str | Path | None = None, *, required: bool = True,
               who: str = "server") -> str | None:
    """The shared token: from ``token_file`` if given, else ``$OIAFED_TOKEN``.

    Raises:
        InputError: when the file cannot be read or is empty, or no token is found while
            ``required``.
    """
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the token file {path}: {exc}") from exc
        if not token:
            raise InputError(f"the token file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if required:
        raise InputError(
            f"no token: the {who} needs the shared token in ${TOKEN_ENV} or a file given with "
            "--token-file (or --no-token to run without one: anyone who reaches the port joins)"
        )
    return None


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
    """The server's side: the token clients must present, and its TLS material.

    Attributes:
        token: the shared token (None: no token is asked for; only with ``require_token``
            False).
        require_token: refuse to start without a token (the default).
        tls_cert, tls_key: PEM files of the server's certificate chain and private key.
        tls_client_ca: PEM file of the CA that signs client certificates; setting it turns on
            mutual TLS (clients without a valid certificate are refused).
    """

    token: str | None = None
    require_token: bool = True
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None

    @classmethod
    def from_options(cls, *, token_file: str | Path | None = None, no_token: bool = False,
                     tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                     tls_client_ca: str | Path | None = None) -> ServerSecurity:
        """From command-line options (the token from ``token_file`` or ``$OIAFED_TOKEN``)."""
        token = None if no_token else read_token(token_file, who="server")
        security = cls(token, not no_token, tls_cert, tls_key, tls_client_ca)
        security.check()
        return security

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> None:
        """Raise ``InputError`` on an inconsistent combination."""
        if self.require_token and not self.token:
            raise InputError(f"no token: set ${TOKEN_ENV} or --token-file (or --no-token)")
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
        return [TokenInterceptor(self.token)] if self.token else []


@dataclass
class ClientSecurity:
    """The client's side: the token it presents and its TLS material.

    Attributes:
        token: the shared token (None: none is sent).
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
        token = None if no_token else read_token(token_file, who="client")
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

    def metadata(self) -> list[tuple[str, str]]:
        return [(METADATA_KEY, SCHEME + self.token)] if self.token else []


def token_matches(metadata: Any, token: str) -> bool:
    """Whether the call ``metadata`` carries ``token`` (compared in constant time)."""
    presented = ""
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str) and value.startswith(SCHEME):
            presented = value[len(SCHEME):]
    return hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8"))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call whose metadata lacks the shared token with ``UNAUTHENTICATED``."""

    def __init__(self, token: str) -> None:
        self.token = token

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            logger.warning("refused a connection from %s: missing or wrong token", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: the server did not accept this client")

        self._refuse = grpc.stream_stream_rpc_method_handler(refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if token_matches(handler_call_details.invocation_metadata, self.token):
            return await continuation(handler_call_details)
        return self._refuse
