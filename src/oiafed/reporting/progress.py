"""A transient progress bar over a known list of items, for the reporting commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

Item = TypeVar("Item")


def tracked(items: Sequence[Item], label: str, describe: Callable[[Item], str],
            console: Console | None) -> Iterator[Item]:
    """Yield ``items`` in order while a bar ``label`` (each item named by ``describe``) counts
    them on ``console`` (None: no bar); the bar is gone once the last item is done."""
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), console=console, transient=True,
                  disable=console is None) as progress:
        task = progress.add_task("", total=len(items))
        for item in items:
            progress.update(task, description=describe(item))
            yield item
            progress.advance(task)
