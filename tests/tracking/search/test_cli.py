"""``python -m tracking.search``: bad input fails before anything exists; MLproject's entry."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from tests.conftest import ROOT
from tests.tracking.search.helpers import ROTATION, write_search
from tracking.search import cli as search
from tracking.search import names as N
from tracking.search import study as search_study
from tracking.search.plan import Options
from tracking.search.space import load_search


def test_cli_refuses_a_bad_file_before_anything_exists(tmp_path, capsys):
    bad = write_search(tmp_path, {"optim.lrr": {"type": "float", "low": 0.001, "high": 0.1}})
    assert search.main(["--config", str(bad), "--storage", f"journal:{tmp_path}/x.log"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "x.log").exists()
    assert search.main(["--epochs", "two"]) == 2
    assert "--epochs='two' is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["/sys/optuna.log", "/proc/version"])  # unwritable even for root
def test_an_unwritable_journal_is_one_line_and_exit_2(tracking_uri, path, capsys):
    assert search.main(["--config", str(ROOT / "experiments/search.yaml"), "--storage", f"journal:{path}",
                        "--n-trials", "1", "--epochs", "1", "--train-limit", "500", "--test-limit", "100"]) == 2
    err = capsys.readouterr().err
    assert f"storage 'journal:{path}' cannot be written" in err and len(err.strip().splitlines()) == 1


def test_empty_cli_values_mean_unset():
    opts = search.parse_args(["--n-trials", "", "--epochs", "", "--storage", "", "--workers", "",
                              "--sampler-seed", "", "--timeout", "", "--train-limit", "", "--test-limit", ""])
    assert opts == Options()


def test_mlproject_search_entry_passes_every_parameter():
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["search"]
    params = entry["parameters"]
    assert set(params) == {"config", "n_trials", "epochs", "storage", "study_name", "budget_minutes",
                           "hard_budget", "timeout", "workers", "enqueue_base", "sampler_seed", "train_limit", "test_limit",
                           "max_params", "set"}
    argv = shlex.split(entry["command"].format(**{k: shlex.quote(v["default"])
                                                  for k, v in params.items()}))
    assert argv[:3] == ["python", "-m", "tracking.search"]
    assert search.parse_args(argv[3:]) == Options()  # '' everywhere: the file decides


def test_bad_shared_options_are_refused_before_anything_exists(tmp_path, capsys):
    assert search.main(["--study-trials", "3", "--n-trials", "2",
                        "--storage", f"sqlite:///{tmp_path}/o.db"]) == 2
    assert "not both" in capsys.readouterr().err
    assert search.main(["--study-trials", "3", "--storage", f"journal:{tmp_path}/o.log"]) == 2
    assert "needs a database storage with heartbeats" in capsys.readouterr().err
    assert search.main(["--study-trials", "0"]) == 2
    assert "--study-trials='0' is not allowed" in capsys.readouterr().err
    assert search.main(["--heartbeat", "0"]) == 2
    config = write_search(tmp_path, ROTATION, budget_minutes=None)
    assert search.main(["--config", str(config), "--hard-budget", "true"]) == 2
    assert "a hard budget (--hard-budget, search.hard_budget) ends running trials at the time budget, and there is none" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.yaml"]


def wait_for_trial_epoch(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until a trial has logged an epoch, so a signal lands in training (the store is only read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        client = mlflow.MlflowClient()
        if any(r.data.metrics for e in client.search_experiments() for r in client.search_runs(
                [e.experiment_id], filter_string=f"tags.{N.ROLE} = '{N.TRIAL_ROLE}'")):
            return
        time.sleep(0.2)
    pytest.fail(f"no trial run within {timeout} s (rc {proc.poll()}): {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signalled_search_exits_like_a_stage_run(tmp_path, tracking_uri, signum):
    """128 + the signal, as tracking.stage: 130 for Ctrl-C, 143 for SIGTERM."""
    config = write_search(tmp_path, ROTATION)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracking.search", "--config", str(config), "--n-trials", "3",
         "--epochs", "8", "--train-limit", "2000", "--test-limit", "300", "--set", "data.val_size=500",
         "--storage", f"journal:{tmp_path}/optuna.log", "--study-name", "sig"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_trial_epoch(proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted: run the same command again to resume the study"


def test_another_search_space_for_an_existing_study_is_refused_before_any_run(tmp_path, tracking_uri,
                                                                           capsys):
    first = write_search(tmp_path, ROTATION)
    storage = f"journal:{tmp_path}/optuna.log"
    made = load_search(first, {"optim.epochs": 1, "data.train_limit": 256, "data.test_limit": 100})
    search_study.open_study(made, search_study.open_storage(storage), "sp")  # as a search does
    (tmp_path / "other").mkdir()
    other = write_search(tmp_path / "other", {
        **ROTATION, "optim.batch_size": {"type": "categorical", "choices": [64, 128]}})
    tiny = ["--n-trials", "1", "--epochs", "1", "--train-limit", "256", "--test-limit", "100"]
    assert search.main(["--config", str(other), "--storage", storage, "--study-name", "sp", *tiny]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " INFO mlflow" not in line]
    assert err == [f"error: study 'sp' was made with another search space: {other} adds "
                   "optim.batch_size; use the study's search file or another --study-name"]
    client = mlflow.MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


STUDY_ENTRY = b'{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n'


@pytest.mark.parametrize("content, why", [
    (STUDY_ENTRY + b"{not json\n" + STUDY_ENTRY, "line 2 is not JSON"),
    (STUDY_ENTRY + b"\x00\xff\x00\n", "line 2 is not JSON"),  # failed mid-search before
    (b'{"op_code": 0}\n', "KeyError"),
])
def test_a_damaged_journal_is_one_line_and_exit_2(tmp_path, unmade_store_uri, capsys, content, why):
    journal = tmp_path / "optuna.log"
    journal.write_bytes(content)
    assert search.main(["--config", str(ROOT / "experiments/search.yaml"), "--storage", f"journal:{journal}",
                        "--n-trials", "1", "--epochs", "1", "--train-limit", "256", "--test-limit", "100"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: storage 'journal:{journal}': the journal file is damaged (") and why in err
    assert journal.read_bytes() == content and not (tmp_path / "mlflow.db").exists()  # no store
    client = mlflow.MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
