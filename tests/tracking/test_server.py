import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.services import free_port
from tracking import runs, server


def test_bad_server_arguments_are_refused(capsys):
    assert server.main(["--port", "0"]) == 2
    assert "--port=0 is not allowed" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_logged_through_the_tracking_server_lands_in_its_stores(tmp_path, monkeypatch, mnist,
                                                                      tiny_config):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracking.server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
                time.sleep(0.5)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("team")
        outcome = runs.run_training(tiny_config, mnist=mnist, progress=False)

        run = MlflowClient().get_run(outcome.run_id)
        assert run.info.status == "FINISHED" and run.data.params["stage"] == "stage3"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        assert any((tmp_path / "artifacts").rglob("curves.png"))
        model = mlflow.pyfunc.load_model(f"runs:/{outcome.run_id}/model")
        assert np.asarray(model.predict(mnist.test_x[:4, None].astype(np.float32))).shape == (4, 10)
    finally:
        mlflow.set_tracking_uri(None)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
