"""The MLflow UI as a user sees it, in headless Chromium: runs, a search's nesting, the champion.

Marked `browser` and `slow`; skipped without Chromium, except under `.ci/run`
(MNIST_MLFLOW_REQUIRE_SERVICES=1). Screenshots go to $MNIST_MLFLOW_SCREENSHOTS
(default <tmp>/mnist-mlflow-screenshots) and their folder is printed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlflow import config as C
from tests.browser import Browser
from tests.services import ROOT, chromium_binary, tracking_server
from tests.tracking.test_search import ROTATION, options, write_search
from tracking import promote, runs, search

pytestmark = [pytest.mark.slow, pytest.mark.browser]

MODE = "workflowType=machine_learning"  # the UI's "Model training" view, not GenAI


def leaf(text: str) -> str:
    """JS: the innermost element whose whole text is `text` (the last one, if several)."""
    return ("[...document.querySelectorAll('*')].filter(e => e.children.length == 0 && "
            f"e.textContent.trim() == '{text}').pop()")


def run_name_cells() -> str:
    """JS: the run-name cells of the runs table, top to bottom, as [name, has expander]."""
    return ("[...document.querySelectorAll('[id^=\"cell-attributes.`Run Name`\"]')]"
            ".map(c => [c.closest('[role=row]'), c])"
            ".sort((a, b) => +a[0].getAttribute('aria-rowindex') - +b[0].getAttribute('aria-rowindex'))"
            ".map(([r, c]) => [c.innerText.split('\\n').pop().trim(), !!c.querySelector('button')])")


def toggle_columns(browser: Browser, *names: str) -> None:
    """Columns -> tick or untick each name -> close the menu, with real mouse clicks."""
    browser.click("[...document.querySelectorAll('button')].find(e => e.innerText.trim() == 'Columns')")
    browser.wait_for_text(*names)
    for name in names:
        browser.click(leaf(name))  # the menu is the page's last element holding the name
    browser.press("Escape", 27)


def screenshot_folder() -> Path:
    folder = Path(os.environ.get("MNIST_MLFLOW_SCREENSHOTS")
                  or Path(tempfile.gettempdir()) / "mnist-mlflow-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def small_config(epochs: int) -> C.RunConfig:
    return C.load(ROOT / "experiments/stage3.yaml", {"optim.epochs": epochs, "data.train_limit": 1000,
                                                     "data.test_limit": 500, "device": "cpu",
                                                     "optim.batch_size": 32})


def test_the_ui_lists_runs_nests_the_search_and_shows_the_champion(tmp_path, monkeypatch, mnist):
    chromium_binary()  # skip (or fail in CI) before any work when there is no browser
    shots = screenshot_folder()
    with tracking_server(f"sqlite:///{tmp_path}/server.db", tmp_path) as url:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            monkeypatch.delenv(var, raising=False)
        mlflow.set_tracking_uri(url)
        try:
            stages = mlflow.set_experiment("stages").experiment_id
            first = runs.run_training(small_config(1), mnist=mnist, run_name="stage3-short",
                                      log_model_artifact=False, progress=False)
            second = runs.run_training(small_config(2), mnist=mnist, run_name="stage3-long",
                                       progress=False)
            history = [h.test_accuracy for h in second.result.history]
            promoted = promote.promote(target=min(history), hold=2, experiment="stages", mnist=mnist)
            found = search.run_search(options(tmp_path, write_search(tmp_path, ROTATION), n_trials=3,
                                              experiment="search"), mnist=mnist)
            client = MlflowClient()
            accuracy = {r.run_id: client.get_run(r.run_id).data.metrics["test_accuracy"]
                        for r in (first, second)}
            search_exp = client.get_run(found.parent_run_id).info.experiment_id
            parent_name = client.get_run(found.parent_run_id).info.run_name
        finally:
            mlflow.set_tracking_uri(None)

        browser = Browser(tmp_path / "chromium.log")
        try:
            # Two stage runs, each with its test_accuracy (the value the server stores)
            browser.goto(f"{url}/#/experiments/{stages}/runs?{MODE}")
            browser.wait_for_text("stage3-short", "stage3-long", "Columns")
            browser.click("document.querySelector('button[aria-label=Close]')")  # the AI assistant panel
            toggle_columns(browser, "test_accuracy", "Dataset")  # show one, hide the other
            text = browser.wait_for_text("test_accuracy", *(str(v) for v in accuracy.values()))
            assert "2 matching runs" in text
            browser.screenshot(shots / "1-stage-runs.png")

            # The search: one parent; its trials appear only when it is expanded, right under it
            browser.goto(f"{url}/#/experiments/{search_exp}/runs?{MODE}")
            browser.wait_for_text(parent_name, "4 matching runs")
            assert browser.evaluate(run_name_cells()) == [[parent_name, True]]
            browser.click(f"{leaf(parent_name)}.closest('[role=gridcell]').querySelector('button')")
            browser.wait_for_text("trial-0", "trial-1", "trial-2")
            rows = browser.evaluate(run_name_cells())
            assert rows[0] == [parent_name, True]
            assert sorted(rows[1:]) == [["trial-0", False], ["trial-1", False], ["trial-2", False]]
            toggle_columns(browser, "test_accuracy", "Dataset")
            browser.wait_for_text("test_accuracy")
            browser.screenshot(shots / "2-search-nested.png")

            # The registered model's page: version 1 carries the champion alias
            browser.goto(f"{url}/#/models/{promoted.model_name}?{MODE}")
            text = browser.wait_for_text(promoted.model_name, "Version 1", "champion")
            browser.screenshot(shots / "3-registered-model.png")
        finally:
            browser.close()
    print(f"\nUI screenshots: {shots}")
    assert promoted.run_id == second.run_id and promoted.version == "1"
