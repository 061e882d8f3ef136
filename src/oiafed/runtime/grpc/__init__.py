"""``runtime.mode: grpc``: a real deployment, a server process and client processes.

* ``runtime.address`` set (what ``oiafed server --address HOST:PORT`` does): this process is the
  server; it listens there and waits for clients started elsewhere with ``oiafed client``.
* ``runtime.address`` unset: a whole deployment on this machine: the server listens on a free
  port of 127.0.0.1 and starts one ``oiafed client`` process per client (each with its own
  token, from a fresh random secret), logging each to ``<run folder>/clients/<client id>.log``.

The server waits for ``runtime.min_join`` clients (default: all) before the first round, for at
most ``runtime.join_timeout`` seconds (default: no limit; 300 on loopback). The token and TLS
material of a server come from ``use_security`` (the ``oiafed server`` flags), else the secret
that clients' tokens derive from comes from ``$OIAFED_SECRET``; a server without a secret refuses
to start unless told ``--no-token``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from oiafed.config import ExperimentConfig
from oiafed.exceptions import ConfigError, DeploymentError
from oiafed.runtime.grpc.auth import ClientSecurity, ServerSecurity
from oiafed.runtime.grpc.loopback import LOOPBACK_MAX_CLIENTS, LoopbackRuntime
from oiafed.runtime.grpc.runtime import GrpcRuntime
from oiafed.runtime.grpc.secure import SecureSettings

__all__ = ["ClientSecurity", "DeploymentError", "GrpcRuntime", "LoopbackRuntime",
           "ServerSecurity", "create", "use_security"]

_SECURITY: ContextVar[ServerSecurity | None] = ContextVar("oiafed_grpc_security", default=None)


@contextlib.contextmanager
def use_security(security: ServerSecurity) -> Iterator[None]:
    """Servers created inside this block (``oiafed.run`` with ``runtime.address``) use
    ``security`` (secret, TLS) instead of ``$OIAFED_SECRET`` alone."""
    token = _SECURITY.set(security)
    try:
        yield
    finally:
        _SECURITY.reset(token)


def create(cfg: ExperimentConfig) -> GrpcRuntime:
    """The server runtime (``runtime.address`` set) or a loopback deployment (unset).

    Raises:
        ConfigError: on ``runtime.min_join`` above the number of clients, or a loopback
            deployment of more than ``LOOPBACK_MAX_CLIENTS`` clients.
        InputError: when a server has no secret and was not told to run without tokens.
    """
    runtime, num_clients = cfg.runtime, cfg.data.num_clients
    if runtime.min_join is not None and runtime.min_join > num_clients:
        raise ConfigError(f"{runtime.min_join} is more than the {num_clients} clients of the "
                          "federation", "runtime.min_join")
    if runtime.address:
        security = _SECURITY.get() or ServerSecurity.from_options()
        server = GrpcRuntime(runtime.address, security, min_join=runtime.min_join,
                             join_timeout=runtime.join_timeout,
                             hello_timeout=runtime.hello_timeout, max_streams=runtime.max_streams)
        server.secure = SecureSettings.from_config(cfg)
        return server
    if num_clients > LOOPBACK_MAX_CLIENTS:
        raise ConfigError(
            f"a loopback gRPC deployment starts one process per client; {num_clients} clients "
            f"is more than {LOOPBACK_MAX_CLIENTS}: use runtime.mode parallel or ray, or set "
            "runtime.address and start the clients yourself", "runtime.mode")
    loopback = LoopbackRuntime(cfg)
    loopback.secure = SecureSettings.from_config(cfg)
    return loopback
