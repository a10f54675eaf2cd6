"""No run RUNNING for ever: owner records, the liveness rule, tracking.doctor, --resume of a live run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.services import wait_until
from tracking import doctor, stage
from tracking.lifecycle import liveness, runs


def make_run(tags: dict[str, str]) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name("doctor") or mlflow.set_experiment("doctor")
    return client.create_run(exp.experiment_id, tags=tags).info.run_id


def owner(**changes) -> dict[str, str]:
    return {**liveness.owner_tags(), **{f"liveness.{k}": str(v) for k, v in changes.items()}}


def test_every_tracked_run_records_its_owner_and_a_heartbeat(tracking_uri, mnist, tiny_config):
    mlflow.set_experiment("doctor")
    outcome = runs.run_training(tiny_config, mnist=mnist, progress=False, log_model_artifact=False)
    run = MlflowClient().get_run(outcome.run_id)
    tags = run.data.tags
    assert tags["liveness.host"] == socket.gethostname() and tags["liveness.pid"] == str(os.getpid())
    assert tags["liveness.boot_id"] == liveness.boot_id()
    assert float(tags["liveness.heartbeat"]) > float(tags["liveness.started"])  # beat after the epochs
    assert run.data.params["threads"] == "1" and run.data.params["threads_resolved"] == "1"


def test_the_liveness_rule(tracking_uri):
    now = time.time()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cases = {
        "this process": (owner(), "alive"),
        "a pid that exited": (owner(pid=gone.pid), "dead"),
        "a pid reused by a younger process": (owner(started=now - 10**6), "dead"),
        "a host rebooted since": (owner(boot_id="another-boot"), "dead"),
        "another host, fresh heartbeat": (owner(host="elsewhere", heartbeat=now - 60), "alive"),
        "another host, old heartbeat": (owner(host="elsewhere", heartbeat=now - 3600), "dead"),
        "shared, live pid but old heartbeat": (owner(shared="true", heartbeat=now - 3600), "dead"),
        "shared, fresh heartbeat, pid gone": (owner(shared="true", pid=gone.pid), "alive"),
        "no owner recorded": ({}, "unknown"),
    }
    client = MlflowClient()
    for what, (tags, expected) in cases.items():
        verdict = liveness.judge(client.get_run(make_run(tags)))
        assert verdict.state == expected, (what, verdict)
    # a slow heartbeat interval raises the limit: three missed beats, at least
    slow = owner(host="elsewhere", heartbeat=now - 900, interval_s=600)
    assert liveness.judge(client.get_run(make_run(slow))).alive


def test_doctor_fixes_only_dead_runs_and_rejudges_before_marking(tracking_uri, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = make_run(owner(pid=gone.pid, heartbeat=time.time() - 42))
    alive, unknown = make_run(owner()), make_run({})
    assert doctor.main([]) == 1  # listed, not fixed
    out = capsys.readouterr().out
    assert f"dead    {dead}" in out and f"alive   {alive}" in out and f"unknown {unknown}" in out
    assert MlflowClient().get_run(dead).info.status == "RUNNING"

    assert doctor.main(["--fix"]) == 0
    assert f"marked FAILED: {dead}" in capsys.readouterr().out
    client = MlflowClient()
    fixed = client.get_run(dead)
    assert fixed.info.status == "FAILED"
    assert re.fullmatch(rf"tracking\.doctor: pid {gone.pid} on {re.escape(socket.gethostname())} "
                        r"is gone \(last heartbeat \d+ s ago\)", fixed.data.tags["error"])
    assert abs(fixed.info.end_time / 1000 - float(fixed.data.tags["liveness.heartbeat"])) < 1
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(unknown).info.status == "RUNNING"
    # a run that was resumed between the listing and the fix is left alone
    again = make_run(owner(pid=gone.pid))
    client.set_tag(again, "liveness.pid", str(os.getpid()))
    assert doctor.mark_failed(client, again, liveness.STALE_S) is None
    assert client.get_run(again).info.status == "RUNNING"


def test_running_runs_of_every_experiment_deleted_ones_too_oldest_first(tracking_uri):
    client = MlflowClient()
    first = make_run({})
    time.sleep(0.01)  # start times in milliseconds
    other = client.create_experiment("other")
    second = client.create_run(other, tags={}).info.run_id
    client.delete_experiment(other)
    client.set_terminated(make_run({}), "FINISHED")
    assert [r.info.run_id for r in doctor.running_runs(None)] == [first, second]
    assert [r.info.run_id for r in doctor.running_runs("doctor")] == [first]
    with pytest.raises(mlflow.exceptions.MlflowException, match="'nowhere' does not exist"):
        doctor.running_runs("nowhere")


STAGE_ARGS = ["--train-limit", "1000", "--test-limit", "200", "--set", "optim.batch_size=32",
              "--set", "threads=1", "--experiment", "doctor", "--no-progress"]


def start_stage(epochs: int, folder) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNIST_MLFLOW_HEARTBEAT_S": "0.5"}
    log = open(folder / f"stage-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "tracking.stage", str(ROOT / "experiments/stage3.yaml"),
                             "--epochs", str(epochs), *STAGE_ARGS], cwd=folder, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def run_of(pid: int):
    exp = MlflowClient().get_experiment_by_name("doctor")
    found = exp and MlflowClient().search_runs([exp.experiment_id],
                                               f"tags.`liveness.pid` = '{pid}'")
    return found[0] if found else None


@pytest.mark.slow
def test_a_sigkilled_stage_run_is_marked_failed_a_live_one_is_left_alone(tracking_uri, tmp_path, capsys):
    mlflow.set_experiment("doctor")  # the store exists before two processes open it at once
    victim, live = start_stage(6, tmp_path), start_stage(500, tmp_path)
    try:
        def checkpointed(proc):
            run = run_of(proc.pid)
            return run and any(MlflowClient().list_artifacts(run.info.run_id, "checkpoint")) and run

        killed = wait_until(lambda: checkpointed(victim), 300, "the victim's first epoch", victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        running = wait_until(lambda: run_of(live.pid), 300, "the live run", live)
        beat = float(running.data.tags["liveness.heartbeat"])
        wait_until(lambda: float(MlflowClient().get_run(running.info.run_id).data.tags[
            "liveness.heartbeat"]) > beat, 30, "a heartbeat from the thread", live)
        assert MlflowClient().get_run(killed.info.run_id).info.status == "RUNNING"  # left behind

        # --resume refuses the run that is still training
        assert stage.main(["--resume", running.info.run_id]) == 2
        assert f"run {running.info.run_id} is still running (pid {live.pid} on" in capsys.readouterr().err

        assert doctor.main(["--fix"]) == 0
        out = capsys.readouterr().out
        assert f"marked FAILED: {killed.info.run_id}" in out
        assert f"marked FAILED: {running.info.run_id}" not in out
        client = MlflowClient()
        assert client.get_run(killed.info.run_id).info.status == "FAILED"
        assert f"pid {victim.pid}" in client.get_run(killed.info.run_id).data.tags["error"]
        assert client.get_run(running.info.run_id).info.status == "RUNNING"
        assert live.poll() is None  # the live training went on

        # the dead run resumes to its end
        assert stage.main(["--resume", killed.info.run_id, "--no-progress"]) == 0
        assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    finally:
        for proc in (victim, live):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (victim, live):
            proc.wait(60)
    assert MlflowClient().get_run(running.info.run_id).info.status == "KILLED"


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "-inf"])
def test_stale_after_must_be_a_finite_positive_number(tracking_uri, capsys, value):
    # nan compares false with everything: it would judge every run alive (or dead) silently
    assert doctor.main([f"--stale-after={value}"]) == 2
    err = capsys.readouterr().err
    assert f"--stale-after={value}" in err and "a finite number of seconds, more than 0" in err
    assert err.count("\n") == 1
