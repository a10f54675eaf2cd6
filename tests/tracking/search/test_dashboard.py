"""optuna-dashboard on a search's storage: the command the search prints, and what it shows.

The browser test is marked `browser` and `slow`; it needs Chromium, Playwright and
optuna-dashboard (pip install -e '.[test,dashboard]'), skipped without them except under
`.ci/run` (MNIST_MLFLOW_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.services import (chromium_page, free_port, missing, page_shows, screenshot_folder, stop,
                            wait_until)
from tests.tracking.search.helpers import ROTATION, write_search
from tracking.search import dashboard
from tracking.search import cli as search


def test_the_command_opens_the_same_storage_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert dashboard.command("sqlite:///optuna.db") == ["optuna-dashboard", f"sqlite:///{here}/optuna.db"]
    assert dashboard.command("sqlite:////srv/o.db?timeout=30", port=9000) == [
        "optuna-dashboard", "--port", "9000", "sqlite:////srv/o.db?timeout=30"]
    assert dashboard.command("journal:runs/o.log") == [
        "optuna-dashboard", "--storage-class", "JournalFileStorage", f"{here}/runs/o.log"]
    # a password is never printed (logs); the user types it back in
    assert dashboard.command("postgresql://mlflow:secret@db-host/optuna") == [
        "optuna-dashboard", "postgresql://mlflow:***@db-host/optuna"]


def dashboard_executable() -> Path:
    """optuna-dashboard's script next to this Python (the project's environment)."""
    exe = Path(sys.executable).parent / "optuna-dashboard"
    if not exe.exists():
        missing("optuna-dashboard is not installed (pip install -e '.[dashboard]')")
    return exe


@pytest.mark.slow
@pytest.mark.browser
def test_the_printed_dashboard_command_shows_the_search_trials(tmp_path, tracking_uri, capsys):
    exe = dashboard_executable()
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ["--config", str(write_search(tmp_path, ROTATION)), "--n-trials", "3", "--epochs", "2",
            "--storage", storage, "--study-name", "dashboard-study", "--sampler-seed", "0",
            "--train-limit", "1000", "--test-limit", "300", "--experiment", "dashboard",
            "--set", "data.val_size=500 device=cpu optim.batch_size=32"]
    assert search.main(args) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("optuna dashboard: ")]
    printed = shlex.split(line.removeprefix("optuna dashboard: "), comments=True)
    assert printed == dashboard.command(storage)

    port = free_port()
    log = tmp_path / "optuna-dashboard.log"
    argv = [str(exe), *dashboard.command(storage, port)[1:]]  # the printed command, on a free port
    with open(log, "w") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/api/studies", timeout=2).status == 200,
                   60, "optuna-dashboard", proc, log)
        with chromium_page() as page:
            page.goto(f"{url}/dashboard")
            page_shows(page, "dashboard-study", "Direction: MINIMIZE")  # the hold epoch: lower is better
            page.get_by_text("dashboard-study").first.click()
            page_shows(page, "dashboard-study (id=1)", "History", "Hyperparameter Importance",
                       "Best Trial")
            page.screenshot(path=screenshot_folder() / "5-optuna-dashboard.png")
            page.goto(f"{url}/dashboard/studies/1/trials")
            text = page_shows(page, "3 Trials", "Trial 0", "Trial 1", "Trial 2",
                              "augment.rotation_degrees", "Intermediate Values")
            assert text.count("Complete") >= 3
            page.screenshot(path=screenshot_folder() / "6-optuna-dashboard-trials.png")
    finally:
        stop(proc)
