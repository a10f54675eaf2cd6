"""The champion served by the real `mlflow models serve`, answering real JSON over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mnist_mlflow import config as C
from mnist_mlflow.models import MAX_BATCH
from tests.conftest import ROOT
from tests.services import free_port
from tracking.promote import promote
from tracking.lifecycle.runs import run_training

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"  # never anything but the loopback interface
MODEL_URI = "models:/mnist-8k@champion"
START_TIMEOUT_S = 120


def wait_for_ping(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no /ping answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def invoke(url: str, x: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": x.tolist()}).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return np.asarray(json.loads(r.read())["predictions"], dtype=np.float64)


def refused_bodies(x: np.ndarray) -> list[bytes]:
    """The request for x[:1] with one pixel written as null, 1e400 and 300 (raw JSON text)."""
    pixels = json.dumps({"inputs": x[:1].tolist()})
    first = json.dumps(float(x[0, 0, 0, 0]))  # the first pixel's JSON text, replaced once
    assert pixels.count(first) >= 1
    return [pixels.replace(first, bad, 1).encode() for bad in ("null", "1e400", "300")]


def post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def stop(proc: subprocess.Popen) -> None:
    """The server forks workers: signal its whole process group, escalate if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def test_served_champion_answers_like_the_local_model(tracking_uri, tiny_config, mnist,
                                                      tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative ./mlruns artifact root stays out of the repo
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().create_experiment(
        "serve", artifact_location=(tmp_path / "artifacts").as_uri()))
    cfg = C.replace(tiny_config, {"optim.epochs": 1})
    outcome = run_training(cfg, mnist=mnist, run_name="serve", progress=False)
    promoted = promote("mnist-8k", target=1, hold=1, mnist=mnist)
    assert promoted.run_id == outcome.run_id

    x = mnist.test_x[:8, None].astype(np.float32)
    local = np.asarray(mlflow.pyfunc.load_model(MODEL_URI).predict(x))

    port = free_port()
    url = f"http://{HOST}:{port}"
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI,
           "--env-manager", "local", "--host", HOST, "-p", str(port), "-w", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, for stop()
    try:
        wait_for_ping(proc, url, log)
        served = invoke(url, x)
        refused = [post(url, body) for body in refused_bodies(x)]
        scaled = post(url, json.dumps({"inputs": (x[:2] / 255).tolist()}).encode())
        image = "[[" + ",".join(["[" + ",".join(["0.0"] * 28) + "]"] * 28) + "]]"
        too_many = post(url, ('{"inputs": [' + ",".join([image] * (MAX_BATCH + 1)) + "]}").encode())
    finally:
        stop(proc)

    # null and 1e400 parse to NaN and inf; the contract is 0-255: 400 with the reason, never NaN logits
    for status, text in refused:
        assert status == 400 and "input pixels must be finite numbers in 0-255" in text, (status, text[:500])

    # ToTensor's 0-1 images came back as class 1 each; more than MAX_BATCH images ran for minutes
    assert scaled[0] == 400 and "input pixels must be raw 0-255, not scaled to 0-1" in scaled[1], scaled
    assert too_many[0] == 400 and "over the limit of 4,096 a call" in too_many[1], too_many[1][:500]

    assert served.shape == (8, 10)
    np.testing.assert_allclose(served, local, rtol=1e-4, atol=1e-4)
    assert (served.argmax(1) == local.argmax(1)).all()
