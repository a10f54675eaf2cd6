"""Two promoters that share nothing but a real `mlflow server`, started at the same moment.

Each promoter is its own process with its own working and temporary folder (so no lock file
could be shared) and an HTTP tracking URI. In every round both promote the same run under a
fresh model name at the same instant (a file barrier, in the test's folder, lines them up
after their imports); the registry alone must leave exactly one version and one @champion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mnist_mlflow.config import ModelConfig
from mnist_mlflow.evaluation import evaluate
from mnist_mlflow.models import TinyNet, count_params
from tests.services import ROOT, SERVER_GROUP
from tracking.lifecycle.safe_model import MADE_BY

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(SERVER_GROUP)]  # the shared tracking server

ROUNDS = 10
PROMOTER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from mnist_mlflow.data import load_mnist
    from tracking import promote as P

    me, barrier, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    mnist = load_mnist()
    registered = []
    original = P.register

    def register(*args, **kwargs):  # counts how often both promoters really created a version
        registered.append(True)
        return original(*args, **kwargs)

    P.register = register
    for i in range(rounds):
        (barrier / f"{i}-{me}").touch()
        deadline = time.monotonic() + 300
        while len(list(barrier.glob(f"{i}-*"))) < 2:
            if time.monotonic() > deadline:
                sys.exit(f"round {i}: the other promoter never came")
            time.sleep(0.002)
        registered.clear()
        r = P.promote(f"race-{i}", target=float(os.environ["TARGET"]), hold=2, experiment="race",
                      mnist=mnist)
        print(json.dumps({"round": i, "created": r.created, "version": r.version,
                          "registered": bool(registered)}), flush=True)
""")


def hand_logged_run(mnist) -> tuple[str, float]:
    """A FINISHED run whose logged model really scores its logged accuracy (untrained: fast)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    _, acc = evaluate(model, torch.from_numpy(mnist.test_x[:500]).unsqueeze(1),
                      torch.from_numpy(mnist.test_y[:500]))
    with mlflow.start_run(run_name="champion-to-be", tags=dict([MADE_BY])) as run:  # as training logs
        mlflow.log_params({"num_params": count_params(model), "data.test_limit": 500,
                           **{f"model.{k}": v for k, v in dataclasses.asdict(ModelConfig()).items()}})
        for epoch in (1, 2):
            mlflow.log_metric("test_accuracy", acc, step=epoch)
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    return run.info.run_id, acc


def test_two_promoters_on_two_machines_converge_on_one_version(tmp_path, mnist, server_uri):
    url = server_uri
    mlflow.set_experiment("race")
    run_id, acc = hand_logged_run(mnist)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    for me in ("a", "b"):
        home = tmp_path / f"machine-{me}"
        (home / "tmp").mkdir(parents=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "TMPDIR": str(home / "tmp"),
               "PYTHONPATH": str(ROOT), "TARGET": repr(acc), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", PROMOTER, me, str(barrier),
                                       str(ROUNDS)], cwd=home, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [
        "\n".join(line for line in err.splitlines() if "Downloading" not in line)[-4000:]
        for _, err in outs]
    results = [[json.loads(line) for line in out.splitlines() if line.startswith("{")]
               for out, _ in outs]
    client = MlflowClient(url)
    for i in range(ROUNDS):
        name = f"race-{i}"
        found = client.search_model_versions(f"name = '{name}'")
        assert len(found) == 1 and found[0].run_id == run_id, (name, found)
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == str(found[0].version)
        assert champion.tags["run_id"] == run_id
        a, b = results[0][i], results[1][i]
        assert sorted([a["created"], b["created"]]) == [False, True]  # one promoted
        assert a["version"] == b["version"] == str(found[0].version)
    raced = sum(results[0][i]["registered"] and results[1][i]["registered"] for i in range(ROUNDS))
    print(f"\n{ROUNDS} rounds against {url}: in {raced} both promoters created a version "
          "(the race), every round ended with one version and one @champion")
    assert raced >= 1, "the promoters never raced: the test did not exercise what it guards"
