"""Reading a JSON-lines file a run appends to (``metrics.jsonl``, ``clients.jsonl``), possibly
while it does: the last line may be cut short (being written, or by a kill) and is skipped."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from oiafed.exceptions import InputError


def iter_jsonl(file: Path, skip: Callable[[str], bool] | None = None
               ) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``file``, one at a time (none when it does not exist). The last
    non-blank line, when it is not JSON, is skipped; so is, unparsed, a line ``skip`` is true
    for.

    Raises:
        InputError: naming the file and line, for another line that is not JSON, a line
            that is not a JSON object, or a file that cannot be read.
    """
    try:
        handle = open(file, encoding="utf-8")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror or exc}") from None
    cut: int | None = None  # a line that is not JSON: an error unless it is the last
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if cut is not None:
                raise InputError(f"{file} line {cut} is not JSON")
            if skip is not None and skip(line):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                cut = number
                continue
            if not isinstance(row, dict):
                raise InputError(f"{file} line {number} is not a JSON object")
            yield row


def read_jsonl(file: Path) -> list[dict[str, Any]]:
    """``iter_jsonl`` as a list."""
    return list(iter_jsonl(file))
