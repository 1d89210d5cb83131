"""Fixtures of the SAM server tests (helpers live in sam_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sam_harness import RunningServer, start_server, stop_server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """start(*cli_args, backend=..., env=..., token=...) -> RunningServer; all stopped after."""
    started: list[RunningServer] = []

    def start(*args: str, **kw) -> RunningServer:
        s = start_server(tmp_path, *args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        stop_server(s)


@pytest.fixture(scope="module")
def classical_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One classical server shared by a module's read-only tests."""
    s = start_server(tmp_path_factory.mktemp("sam"), "--image-cache-size", "4")
    yield s
    stop_server(s)
