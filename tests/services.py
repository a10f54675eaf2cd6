"""Real services for the team tests: PostgreSQL, the MLflow tracking server, headless Chromium.

Each is found on this machine (Debian's packages; `.ci/run` installs them). When one is
missing the test is skipped with the reason, except under MNIST_MLFLOW_REQUIRE_SERVICES=1
(set by `.ci/run`), where a missing service is a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.conftest import ROOT

if TYPE_CHECKING:
    from playwright.sync_api import Page

REQUIRE_ENV = "MNIST_MLFLOW_REQUIRE_SERVICES"
SERVER_GROUP = "tracking-server"  # xdist group: the tests that share tests/tracking/conftest.py's server


def missing(reason: str) -> None:
    """Skips the test, or fails it where CI requires every service."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: CI must run this test)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.3):
    """Polls `check()` until it returns a true value; fails with the process log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        dead = proc is not None and proc.poll() is not None
        if dead or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            state = f"exited {proc.returncode}" if dead else f"not ready after {timeout:.0f} s"
            pytest.fail(f"{what}: {state}\n{tail}")
        time.sleep(interval)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group (started with start_new_session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# ---------------------------------------------------------------- PostgreSQL

def postgres_bindir() -> Path | None:
    """Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<version>/bin."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                         reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
            return Path(folder)
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields its base URL.

    By hand rather than the pytest-postgresql plugin: one fixture, and the root case below.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user
    (created by Debian's package). Trust authentication, loopback only; fsync off: test data.
    """
    bindir = postgres_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="mnist-mlflow-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            missing("running as root without a 'postgres' user to own the test cluster")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = folder / "data", folder / "server.log"
    port = free_port()
    proc = None
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "--encoding=UTF8", "--no-sync"],
                       check=True, capture_output=True, text=True)
        with open(log, "w") as out:
            if as_user:
                os.chown(log, owner.pw_uid, owner.pw_gid)
            proc = subprocess.Popen(
                [*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={folder}",
                 "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                                           str(port)], capture_output=True).returncode == 0,
                   60, "PostgreSQL", proc, log)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"initdb failed: {exc.stderr[-2000:]}")
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    """CREATE DATABASE through psycopg (the project's `postgres` extra); returns its URL."""
    try:
        import psycopg
    except ImportError:
        missing("psycopg is not installed (pip install -e '.[postgres]')")
    with psycopg.connect(base_url + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"


# ---------------------------------------------------------------- the tracking server

@contextlib.contextmanager
def tracking_server(backend_uri: str, folder: Path) -> Iterator[str]:
    """`python -m tracking.server` on a free loopback port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "tracking-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tracking.server", "--backend-store-uri", backend_uri,
             "--artifacts-destination", str(folder / "artifacts"), "--port", str(port),
             "--workers", "2"],
            cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: urllib.request.urlopen(url + "/health", timeout=2).status == 200,
                   120, "tracking server", proc, log)
        yield url
    finally:
        stop(proc)


# ---------------------------------------------------------------- Chromium, through Playwright

def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    missing("Chromium not found (Debian: apt-get install chromium)")


@contextlib.contextmanager
def chromium_page() -> Iterator[Page]:
    """A headless page of this machine's Chromium, driven by Playwright (the `test` extra).

    `executable_path`: Playwright never downloads a browser of its own here.
    """
    executable = chromium_binary()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        # no sandbox: Chromium refuses to start one as root, and the pages are our own local servers
        browser = pw.chromium.launch(executable_path=executable, chromium_sandbox=False,
                                     args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)  # ms; a React app on a busy 2-core machine
            yield page
        finally:
            browser.close()


def page_shows(page: Page, *needles: str) -> str:
    """The page's rendered text once every needle is in it (Playwright retries for up to a minute)."""
    from playwright.sync_api import expect

    body = page.locator("body")
    for needle in needles:
        expect(body).to_contain_text(needle, timeout=60_000)  # ms, as the page's default above
    return body.inner_text()


def screenshot_folder() -> Path:
    """$MNIST_MLFLOW_SCREENSHOTS, else <tmp>/mnist-mlflow-screenshots."""
    folder = Path(os.environ.get("MNIST_MLFLOW_SCREENSHOTS")
                  or Path(tempfile.gettempdir()) / "mnist-mlflow-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
