"""The MLflow UI as a user sees it, in headless Chromium driven by Playwright: runs, a search's
nesting, the champion, a consistency study's seeds figure.

Marked `browser` and `slow`; skipped without Chromium or Playwright, except under `.ci/run`
(MNIST_MLFLOW_REQUIRE_SERVICES=1). Screenshots go to $MNIST_MLFLOW_SCREENSHOTS
(default <tmp>/mnist-mlflow-screenshots) and their folder is printed.
"""

from __future__ import annotations

import struct
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlflow import config as C
from tests.services import (ROOT, SERVER_GROUP, chromium_binary, chromium_page, page_shows,
                            screenshot_folder)
from tests.tracking.search.helpers import ROTATION, options, write_search
from tracking import consistency, promote
from tracking.lifecycle import runs
from tracking.search.run import run_search

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group(SERVER_GROUP)]

MODE = "workflowType=machine_learning"  # the UI's "Model training" view, not GenAI

# JS: the run-name cells of the runs table, top to bottom, as [name, has expander]
RUN_NAME_CELLS = ("[...document.querySelectorAll('[id^=\"cell-attributes.`Run Name`\"]')]"
                  ".map(c => [c.closest('[role=row]'), c])"
                  ".sort((a, b) => +a[0].getAttribute('aria-rowindex') - +b[0].getAttribute('aria-rowindex'))"
                  ".map(([r, c]) => [c.innerText.split('\\n').pop().trim(), !!c.querySelector('button')])")


def toggle_columns(page, *names: str) -> None:
    """Columns -> tick or untick each name -> close the menu, with real mouse clicks."""
    page.get_by_role("button", name="Columns", exact=True).click()
    for name in names:
        page.get_by_text(name, exact=True).last.click()  # the menu is the page's last element holding it
    page.keyboard.press("Escape")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    return struct.unpack(">II", path.read_bytes()[16:24])


def small_config(epochs: int) -> C.RunConfig:
    return C.load(ROOT / "experiments/stage3.yaml", {"optim.epochs": epochs, "data.train_limit": 1000,
                                                     "data.test_limit": 500, "device": "cpu",
                                                     "optim.batch_size": 32})


def test_the_ui_lists_runs_nests_the_search_shows_the_champion_and_the_seeds_figure(
        server_uri, tmp_path, mnist):
    chromium_binary()  # skip (or fail in CI) before any work when there is no browser
    url = server_uri
    shots = screenshot_folder()
    stages = mlflow.set_experiment("stages").experiment_id
    first = runs.run_training(small_config(1), mnist=mnist, run_name="stage3-short",
                              log_model_artifact=False, progress=False)
    second = runs.run_training(small_config(2), mnist=mnist, run_name="stage3-long", progress=False)
    history = [h.test_accuracy for h in second.result.history]
    promoted = promote.promote(target=min(history), hold=2, experiment="stages", mnist=mnist)
    found = run_search(options(tmp_path, write_search(tmp_path, ROTATION), n_trials=3,
                               experiment="search"), mnist=mnist)
    assert consistency.main([str(ROOT / "experiments/stage3.yaml"), "--seeds", "2",
                             "--epochs", "1", "--train-limit", "500", "--test-limit", "300",
                             "--set", "optim.batch_size=32 device=cpu",
                             "--experiment", "consistency"]) == 0
    client = MlflowClient()
    accuracy = {r.run_id: client.get_run(r.run_id).data.metrics["test_accuracy"] for r in (first, second)}
    search_exp = client.get_run(found.parent_run_id).info.experiment_id
    parent_name = client.get_run(found.parent_run_id).info.run_name
    seeds_exp = client.get_experiment_by_name("consistency").experiment_id
    (seeds_parent,) = client.search_runs([seeds_exp], "tags.stage = 'stage3-consistency'")
    seeds_png = Path(client.download_artifacts(seeds_parent.info.run_id, "figures/seeds.png",
                                               str(tmp_path)))

    with chromium_page() as page:
        # Two stage runs, each with its test_accuracy (the value the server stores)
        page.goto(f"{url}/#/experiments/{stages}/runs?{MODE}")
        page_shows(page, "stage3-short", "stage3-long", "Columns")
        page.locator("button[aria-label=Close]").first.click()  # the AI assistant panel
        toggle_columns(page, "test_accuracy", "Dataset")  # show one, hide the other
        text = page_shows(page, "test_accuracy", *(str(v) for v in accuracy.values()))
        assert "2 matching runs" in text
        page.screenshot(path=shots / "1-stage-runs.png")

        # The search: one parent; its trials appear only when it is expanded, right under it
        page.goto(f"{url}/#/experiments/{search_exp}/runs?{MODE}")
        page_shows(page, parent_name, "4 matching runs")
        assert page.evaluate(RUN_NAME_CELLS) == [[parent_name, True]]
        parent_cell = page.get_by_text(parent_name, exact=True).last.locator(
            "xpath=ancestor::*[@role='gridcell'][1]")
        parent_cell.get_by_role("button").click()
        page_shows(page, "trial-0", "trial-1", "trial-2")
        rows = page.evaluate(RUN_NAME_CELLS)
        assert rows[0] == [parent_name, True]
        assert sorted(rows[1:]) == [["trial-0", False], ["trial-1", False], ["trial-2", False]]
        toggle_columns(page, "test_accuracy", "Dataset")
        page_shows(page, "test_accuracy")
        page.screenshot(path=shots / "2-search-nested.png")

        # The registered model's page: version 1 carries the champion alias
        page.goto(f"{url}/#/models/{promoted.model_name}?{MODE}")
        page_shows(page, promoted.model_name, "Version 1", "champion")
        page.screenshot(path=shots / "3-registered-model.png")

        # The consistency parent's artifact view shows its seeds figure, decoded at full size
        page.goto(f"{url}/#/experiments/{seeds_exp}/runs/{seeds_parent.info.run_id}"
                  f"/artifacts/figures/seeds.png")
        figure = page.locator("img[alt='figures/seeds.png']")
        figure.wait_for(state="visible")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
        shown = figure.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert tuple(shown) == png_size(seeds_png)
        page.screenshot(path=shots / "4-consistency-seeds.png")
    print(f"\nUI screenshots: {shots}")
    assert promoted.run_id == second.run_id and promoted.version == "1"
