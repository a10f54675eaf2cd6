"""The tracking store's set-up (tracking/lifecycle/store.py), against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

# For each new store folder in turn, both processes wait for its `go` file and then open the
# store at the same moment, as a search and a plain client (a notebook, `mlflow ui`) may.
# They import once: the imports are most of the time.
OPENER = """
import os, sys, time, traceback
import mlflow
from tracking.lifecycle import store
for folder in sys.argv[2:]:
    while not os.path.exists(folder + "/go"):
        time.sleep(0.001)
    try:
        {open}
        result = "ok"
    except Exception as exc:
        result = repr(exc)[:500]
    with open(folder + "/" + sys.argv[1] + ".tmp", "w") as f:
        f.write(result)
    os.rename(folder + "/" + sys.argv[1] + ".tmp", folder + "/" + sys.argv[1])
"""
OPENS = {"ours": "store.check_store(f'sqlite:///{folder}/mlflow.db')",  # what every entry point runs first
         "plain": "mlflow.MlflowClient(f'sqlite:///{folder}/mlflow.db').search_experiments()"}


@pytest.mark.slow
def test_a_new_sqlite_store_opens_while_a_plain_client_creates_it_too(tmp_path):
    """Two processes migrating one new file break each other's migration (a table or index
    that "already exists", "no such column"): ours was the loser about every other time."""
    folders = [tmp_path / str(i) for i in range(6)]
    for folder in folders:
        folder.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPENER.replace("{open}", code), name, *map(str, folders)],
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.err", "w"))
             for name, code in OPENS.items()]
    try:
        for folder in folders:
            (folder / "go").touch()
            deadline = time.monotonic() + 120
            while not all((folder / name).exists() for name in OPENS):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    [(tmp_path / f"{name}.err").read_text()[-1500:] for name in OPENS]
                time.sleep(0.01)
    finally:
        for p in procs:
            p.kill()
    ours = [(folder / "ours").read_text() for folder in folders]
    assert ours == ["ok"] * len(folders)
    assert not list(tmp_path.glob("*/.mlflow.db.*.new"))  # the store built aside, linked or dropped
