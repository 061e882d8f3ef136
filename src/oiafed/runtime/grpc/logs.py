"""What the server logs of what peers send: escaped, and repeated refusals throttled.

Text a peer chose (a client id, say) goes into a log line only through ``shown``: quoted and
escaped by ``repr`` (a newline cannot start a forged line) and cut to a bounded length. A peer
that is refused again and again (a wrong token, an unknown client id, a silent stream) costs at
most one line per reason every ``REFUSAL_LOG_INTERVAL`` seconds (``LogThrottle``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between two log lines of one refusal reason; the refusals between are counted."""

SHOWN_CHARS = 64
"""The most characters of a peer's text that ``shown`` puts into a log line."""


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` fit for a log line: its ``repr`` (escapes included), cut after ``limit``
    characters (saying how long it was)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class LogThrottle:
    """Logs a warning per reason at most once every ``interval`` seconds; the next line
    logged for that reason says how many were held back since the last.

    Reasons must come from a fixed set (never from a peer): each is remembered.
    """

    def __init__(self, logger: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        """Reason -> (when its last line was logged, lines held back since)."""

    def warning(self, reason: str, message: str, *args: Any) -> None:
        """``logger.warning(message, *args)``, unless ``reason`` was logged too recently."""
        now = time.monotonic()
        last, held = self._last.get(reason, (-self.interval, 0))
        if now - last < self.interval:
            self._last[reason] = (last, held + 1)
            return
        self._last[reason] = (now, 0)
        if held:
            message += " (and %d more like it not logged since the last)"
            args = (*args, held)
        self.logger.warning(message, *args)
