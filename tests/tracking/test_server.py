import base64
import json
import os
import re
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.services import SERVER_GROUP, free_port, stop, wait_until
from tracking import server
from tracking.lifecycle import runs


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port=0 is not allowed: 1-65535"),
    (["--port", "http"], "--port='http' is not an integer"),
    (["--workers", "0"], "--workers='0' is not allowed: 1 or more"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_server_arguments_are_refused_in_one_line(capsys, argv, message):
    assert server.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_binding_beyond_loopback_without_auth_warns(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # main sets it for the server
    started = []
    monkeypatch.setattr(server.os, "execvp", lambda _, cmd: started.append(cmd))  # bind nothing
    server.main(["--host", "0.0.0.0"])
    assert "warning: --host 0.0.0.0 without --auth" in capsys.readouterr().err
    assert started and "--app-name" not in started[0]
    for host in ("127.0.0.1", "localhost", "::1"):
        server.main(["--host", host])
        assert "warning" not in capsys.readouterr().err
    assert not server.is_loopback("::") and not server.is_loopback("tracking-host")


def test_a_too_short_admin_password_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "short")
    for var in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # main sets them
        monkeypatch.setenv(var, "")
    monkeypatch.setattr(server.os, "execvp", lambda *_: pytest.fail("the server must not start"))
    assert server.main(["--auth", "--auth-database-uri", f"sqlite:///{tmp_path}/auth.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 12 characters" in err[0], err
    assert not os.path.exists(os.environ["MLFLOW_AUTH_CONFIG_PATH"])  # no settings file left


def test_the_auth_settings_file_is_private(tmp_path):
    path = server.write_auth_config(f"sqlite:///{tmp_path}/auth.db")
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert f"database_uri = sqlite:///{tmp_path}/auth.db" in open(path).read()
    finally:
        os.unlink(path)


def post(url: str, path: str, body: dict, user: str | None = None, password: str | None = None):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.mark.slow
def test_with_auth_an_anonymous_write_is_refused(tmp_path, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH_")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tracking.server", "--auth", "--backend-store-uri",
             f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts"),
             "--port", str(port), "--workers", "1"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, start_new_session=True,
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: urllib.request.urlopen(url + "/health", timeout=2).status == 200,
                   120, "tracking server --auth", proc, log)
        # no MLFLOW_AUTH_ADMIN_PASSWORD: a generated one, printed once
        password = re.search(r"user 'admin' with password (\S+) \(shown once", log.read_text())[1]
        assert (tmp_path / "mlflow-auth.db").exists()

        status, body = post(url, "/api/2.0/mlflow/experiments/create", {"name": "anonymous"})
        assert status == 401, body
        assert post(url, "/api/2.0/mlflow/experiments/create", {"name": "x"}, "admin", "wrong")[0] == 401
        status, body = post(url, "/api/2.0/mlflow/experiments/create", {"name": "admin's"},
                            "admin", password)
        assert status == 200 and body["experiment_id"], body

        # what the README tells clients to set
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(url)
        client.create_experiment("through the client")
        assert {e.name for e in client.search_experiments()} >= {"admin's", "through the client"}
    finally:
        stop(proc)


@pytest.mark.slow
@pytest.mark.xdist_group(SERVER_GROUP)  # the shared tracking server
def test_a_run_logged_through_the_tracking_server_lands_in_its_stores(shared_server, server_uri, mnist,
                                                                      tiny_config):
    mlflow.set_experiment("team")
    outcome = runs.run_training(tiny_config, mnist=mnist, progress=False)

    run = MlflowClient().get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.params["stage"] == "stage3"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert any(outcome.run_id in p.parts for p in shared_server.artifacts.rglob("curves.png"))
    model = mlflow.pyfunc.load_model(f"runs:/{outcome.run_id}/model")
    assert np.asarray(model.predict(mnist.test_x[:4, None].astype(np.float32))).shape == (4, 10)
