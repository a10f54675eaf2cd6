"""One MLflow tracking server per test process, for the tests that log through one.

A server start (MLflow's migrations, two uvicorn workers importing MLflow) costs seconds: the
tests share it, each in experiments and registered models of its own names. They are marked
`xdist_group(SERVER_GROUP)` (tests/services.py), so that under pytest-xdist one worker starts it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import end_runs_and_forget_the_store, use_tracking_uri
from tests.services import tracking_server


@dataclass(frozen=True)
class Server:
    url: str
    artifacts: Path  # its --artifacts-destination


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory) -> Server:
    """`python -m tracking.server` on a SQLite store, for the whole session."""
    folder = tmp_path_factory.mktemp("tracking-server")
    with tracking_server(f"sqlite:///{folder}/server.db", folder) as url:
        yield Server(url, folder / "artifacts")


@pytest.fixture
def server_uri(shared_server, tmp_path, monkeypatch) -> str:
    """As tracking_uri, but the shared tracking server: this process and its subprocesses log
    there; relative paths land in the test's own folder."""
    yield use_tracking_uri(shared_server.url, tmp_path, monkeypatch)
    end_runs_and_forget_the_store()
