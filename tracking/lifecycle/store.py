"""The tracking store, checked before anything else touches it.

MLflow's own client retries an unreachable server for minutes, waits forever on one that
accepts connections but never answers, and reports an unwritable SQLite file with a
SQLAlchemy traceback after the data has loaded. `check_store` fails within seconds, with one
line. A new SQLite store is created (and migrated) once, under a file lock: two processes
migrating the same new file at once break each other (alembic's `_alembic_tmp_*` tables);
against processes without the lock (plain MLflow), see `create_aside`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import mlflow.store.db.utils
from mlflow.exceptions import MlflowException

TIMEOUT_S = 5.0  # per request; a healthy server answers /health in milliseconds
MIGRATING_S = 10.0  # a store below MLflow's schema that changed this recently is being migrated


class StoreError(MlflowException):
    """The tracking store cannot be used; the message is one line."""


def check_store(uri: str | None = None, timeout: float = TIMEOUT_S) -> None:
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri, timeout)
    elif uri.startswith("sqlite:"):
        check_sqlite(uri)


def check_server(uri: str, timeout: float = TIMEOUT_S) -> None:
    """An HTTP tracking server must answer /health now (the timeout covers a silent one)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StoreError(f"tracking server {uri} cannot be reached ({reason}); start it or set "
                         "MLFLOW_TRACKING_URI to a reachable store, e.g. sqlite:///mlflow.db") from None


def sqlite_path(uri: str) -> Path | None:
    """The file of ``sqlite:///rel.db`` or ``sqlite:////abs.db``; None for in-memory."""
    path = urllib.parse.urlparse(uri).path
    path = path[1:] if path.startswith("/") else path  # sqlite:///x.db -> "x.db"; ////a -> "/a"
    return Path(path.split("?")[0]) if path and path != ":memory:" else None


def check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    folder = path.resolve().parent
    if not folder.is_dir():
        raise StoreError(f"tracking store {uri}: folder {str(folder)!r} does not exist")
    try:  # SQLite writes its journal beside the file: the folder must take new files too
        tempfile.TemporaryFile(dir=folder).close()
        if path.exists():
            open(path, "ab").close()  # writable? (appends nothing)
    except OSError as exc:
        raise StoreError(f"tracking store {uri} is not writable here "
                         f"({exc.strerror or exc}); set MLFLOW_TRACKING_URI to a writable one") from None
    with open(folder / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            if not path.exists():
                create_aside(path)
            wait_for_migration(path)
            # now at its schema: opens without migrating
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy and MLflow raise many kinds
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(f"tracking store {uri} cannot be opened: {first}") from None


def create_aside(path: Path) -> None:
    """A new store is created and migrated in a file of its own, then linked into place.

    Our lock keeps our processes apart, but not a plain MlflowClient or `mlflow ui` opening
    the same new file: two migrations of one file break each other ("table ... already exists",
    "no such column"), and can leave it broken. If another process made the file first, its
    file is the store and ours is dropped.
    """
    new = path.resolve().with_name(f".{path.name}.{os.getpid()}.new")
    try:
        mlflow.MlflowClient(f"sqlite:///{new}").search_experiments(max_results=1)
        os.link(new, path)  # atomic, and never over an existing file
    except FileExistsError:
        pass
    finally:
        new.unlink(missing_ok=True)


def wait_for_migration(path: Path) -> None:
    """While another process migrates the store (below MLflow's schema, changed just now), wait:
    migrating it too would break both."""
    head = mlflow.store.db.utils._get_latest_schema_revision()
    while time.time() - path.stat().st_mtime < MIGRATING_S:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
                if db.execute("select version_num from alembic_version").fetchone() == (head,):
                    return
        except sqlite3.Error:  # no version table yet, or locked by the migration
            pass
        time.sleep(0.2)
