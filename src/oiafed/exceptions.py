"""Every error oiafed raises on purpose, in one hierarchy; ``exit_code`` maps them to the
CLI's exit codes (0 success, 2 bad input, 1 failure, 130 interrupted).

::

    OiafedError
    ├── InputError                 bad input from the user: exit 2
    │   ├── ConfigError
    │   │   └── RegistryError
    │   ├── NotARunFolder
    │   └── RefusedError
    ├── CallbackError
    ├── ClientTrainingError
    ├── RoundFailed
    ├── SelectionError
    ├── RuntimeFailure
    │   ├── WorkerError
    │   └── DeploymentError
    ├── ServerUnreachable
    ├── WireError
    └── ClientStateError
"""

from __future__ import annotations


class OiafedError(Exception):
    """Base class of every error oiafed raises on purpose."""


class InputError(OiafedError):
    """Bad input from the user (config, arguments, files): the CLI exits with 2."""


class ConfigError(InputError):
    """A configuration value is missing, unknown or invalid.

    Attributes:
        path: the dotted key path of the bad value (``trainer.args.rounds``), if known.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class RegistryError(ConfigError):
    """A component name is not registered, or is registered twice in a conflicting way.

    Attributes:
        name: the full name looked up (``callback.early_stoping``).
        known: the names registered for that kind.
        suggestion: the closest known name, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str,
        known: list[str] | None = None,
        suggestion: str | None = None,
        path: str | None = None,
    ) -> None:
        self.name = name
        self.known = known or []
        self.suggestion = suggestion
        super().__init__(message, path=path)


class NotARunFolder(InputError):
    """A folder given as a run folder (``oiafed report``, ``compare``) holds no run.

    Attributes:
        folder: the folder named.
    """

    def __init__(self, folder: str, why: str) -> None:
        self.folder = folder
        super().__init__(f"{folder} is not a run folder ({why})")


class RefusedError(InputError):
    """The server refused this client (token, client id, model, TLS): retrying cannot help."""


class CallbackError(OiafedError):
    """A callback hook raised while ``strict`` mode was on.

    Attributes:
        callback: the label of the callback (its registry name or class name).
        hook: the hook that raised (``on_round_end``).
    """

    def __init__(self, callback: str, hook: str, error: BaseException) -> None:
        self.callback = callback
        self.hook = hook
        super().__init__(f"{callback}.{hook} raised {type(error).__name__}: {error}")


class ClientTrainingError(OiafedError):
    """A client's local training raised while ``strict`` mode was on.

    Attributes:
        client_id: the client whose training raised.
        round_num: the round it trained for.
        traceback: the traceback text, from wherever the client ran.
    """

    def __init__(self, client_id: str, round_num: int, traceback: str) -> None:
        self.client_id = client_id
        self.round_num = round_num
        self.traceback = traceback
        super().__init__(f"round {round_num}: training {client_id} raised (strict mode):\n"
                         f"{traceback.rstrip()}")


class RoundFailed(OiafedError):
    """A round ended with fewer usable updates than the quorum (``min_clients``)."""


class PrivacyError(OiafedError):
    """A client trained outside its differential-privacy mechanism (local DP's DP-SGD): its
    update is not sent."""


class SecureAggregationFailed(RoundFailed):
    """A secure-aggregation round lost so many clients that fewer than its threshold remain
    (``runtime.secure_aggregation.threshold``): the sum cannot be unmasked."""


class SecureAggregationError(OiafedError):
    """A secure-aggregation message is malformed, out of order, replayed or fails
    authentication (a tampered share); the client that sent it is left out of the round."""


class SelectionError(OiafedError):
    """``trainer.client_selection_weights`` holds an unknown id or a bad weight."""


class RuntimeFailure(OiafedError):
    """A runtime cannot train clients any more (its workers or its deployment failed)."""


class WorkerError(RuntimeFailure):
    """Worker processes (or Ray actors) fail to start, or cannot be reached."""


class DeploymentError(RuntimeFailure):
    """The deployment cannot go on (too few clients joined, a client process died at start)."""


class ServerUnreachable(OiafedError):
    """The server could not be reached for ``reconnect_timeout`` seconds."""


class WireError(OiafedError):
    """Bytes received from another process or machine are malformed."""


class ClientStateError(OiafedError):
    """A client's state cannot be stored (bad id or value) or read back (corrupt file)."""


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def exit_code(error: BaseException | None) -> int:
    """The CLI's exit code for a command that ended with ``error`` (None: success)."""
    if error is None:
        return EXIT_OK
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, InputError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED
