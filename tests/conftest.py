"""Fixtures shared by the tests: a registry restored after each test, user modules on disk."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import RegistrySnapshot


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Whatever a test registers is gone afterwards."""
    with RegistrySnapshot():
        yield


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                clean_registry: None) -> Iterator[Callable[[str, str], Path]]:
    """Write a module ``name`` (source ``code``) that ``imports: [name]`` can load.

    The module is forgotten (``sys.modules``) and its registrations dropped after the test.
    """
    folder = tmp_path / "user_modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(name: str, code: str) -> Path:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(code), encoding="utf-8")
        return path

    yield write
    # monkeypatch restores sys.path; a module imported during the test must not linger.
    for name in [p.stem for p in folder.glob("*.py")]:
        sys.modules.pop(name, None)


@pytest.fixture
def event_files_in_creation_order(monkeypatch):
    """Event file names start with the creation second and end with a per-process counter,
    and TensorBoard reads them in name order: writers made in the same second by one process
    sort wrongly once the counter gains a digit (9 -> 10). A resumed run in real life starts
    later; here each writer's clock is pushed on so names sort in creation order."""
    import itertools
    import time
    import types

    from tensorboard.summary.writer import event_file_writer

    pushes = itertools.count()
    clock = types.SimpleNamespace(time=lambda: time.time() + 2 * next(pushes))
    monkeypatch.setattr(event_file_writer, "time", clock)
