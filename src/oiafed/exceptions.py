"""The errors oiafed raises; the CLI maps them to exit codes (bad input -> 2)."""

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
