"""Promotion to the Model Registry, on real small runs in a real SQLite store.

A 1-2 epoch run on 2,000 images never holds 99.4%, so the tests choose targets from the
histories the runs actually produced; the selection logic is the production one.
One store serves the whole module (training is the expensive part); each test uses its
own registered-model name, so the tests do not see each other's versions.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mnist_mlflow import config as C
from mnist_mlflow.models import TinyNet, count_params
from tests.conftest import ROOT, use_fresh_store
from tracking import promote as P
from tracking.promotion import registry
from tracking.lifecycle.safe_model import MADE_BY
from tracking.lifecycle.runs import RunOutcome, run_training

# one worker under pytest-xdist (--dist loadgroup): the module-scoped store is trained once
pytestmark = pytest.mark.xdist_group("promote")


@dataclass
class Store:
    uri: str
    root: object  # pathlib.Path of the store's folder
    over_budget_id: str  # first run: lies about num_params, its real model is too big
    a: RunOutcome  # 1 epoch: can never hold 2 epochs
    b: RunOutcome  # 2 epochs
    tampered_id: str  # in experiment "tamper": a copy of run A, checked by the mismatch test

    @property
    def a_acc(self) -> list[float]:
        return [h.test_accuracy for h in self.a.result.history]

    @property
    def b_acc(self) -> list[float]:
        return [h.test_accuracy for h in self.b.result.history]


def small_config(epochs: int) -> C.RunConfig:
    """conftest's tiny_config, at module scope."""
    return C.load(ROOT / "experiments/stage3.yaml", {"optim.epochs": epochs, "data.train_limit": 2000,
                                                     "data.test_limit": 500, "device": "cpu"})


def model_params(cfg: C.ModelConfig = C.ModelConfig()) -> dict:
    """The `model.*` params a training run logs for `cfg`."""
    return {f"model.{k}": v for k, v in dataclasses.asdict(cfg).items()}


def log_run_by_hand(name: str, history: list[float], model: torch.nn.Module, num_params: int,
                    cfg: C.ModelConfig = C.ModelConfig(), tags: dict | None = None) -> str:
    """A FINISHED run with a test_accuracy history and a logged model, without training;
    by default tagged and configured as a training run of this project logs them."""
    with mlflow.start_run(run_name=name, tags=dict([MADE_BY]) if tags is None else tags) as run:
        mlflow.log_params({"num_params": num_params, "data.test_limit": 500, **model_params(cfg)})
        for epoch, acc in enumerate(history, start=1):
            mlflow.log_metric("test_accuracy", acc, step=epoch)
        # explicit requirements skip MLflow's slow inference of them
        mlflow.pytorch.log_model(model.eval(), name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, mnist):
    root = tmp_path_factory.mktemp("promote")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_fresh_store(root, mp)  # a relative ./mlruns lands in root, not in the repo
        client = MlflowClient()
        for exp in ("main", "tamper"):
            client.create_experiment(exp, artifact_location=(root / exp).as_uri())
        mlflow.set_experiment("main")
        over = log_run_by_hand("over-budget", [99.0, 99.0], TinyNet(width1=16, width2=32), 5000,
                               C.ModelConfig(width1=16, width2=32, max_params=None))
        a = run_training(small_config(1), mnist=mnist, run_name="a", progress=False)
        b = run_training(small_config(2), mnist=mnist, run_name="b", progress=False)
        mlflow.set_experiment("tamper")
        a_history = [h.test_accuracy for h in a.result.history]
        tampered = log_run_by_hand("tampered", a_history, a.result.model,
                                   count_params(a.result.model), small_config(1).model)
        yield Store(uri, root, over, a, b, tampered)
        mlflow.set_tracking_uri(None)


def versions(name: str) -> list:
    return MlflowClient().search_model_versions(f"name = '{name}'")


def test_picks_first_run_that_holds_and_skips_a_model_over_budget(store, mnist):
    # The over-budget run holds 99% on paper and claims 5,000 parameters; A has one epoch.
    result = P.promote("first-hold", target=min(store.b_acc), hold=2, mnist=mnist)

    assert result.run_id == store.b.run_id and result.created and result.version == "1"
    assert result.num_params == count_params(store.b.result.model) <= 8000
    assert result.verified_test_accuracy == pytest.approx(store.b_acc[-1], abs=0.05)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("first-hold", "champion")
    assert str(champion.version) == "1" and champion.run_id == store.b.run_id
    assert champion.tags["run_id"] == store.b.run_id
    assert champion.tags["hold_epochs"] == "2"
    assert float(champion.tags["best_test_accuracy"]) == pytest.approx(max(store.b_acc))
    assert float(champion.tags["held_test_accuracy"]) == pytest.approx(min(store.b_acc))
    assert champion.tags["num_params"] == str(result.num_params)
    assert client.get_registered_model("first-hold").tags["made_by"] == "mnist-mlflow"  # ours

    loaded = mlflow.pytorch.load_model("models:/first-hold@champion")
    x = torch.from_numpy(mnist.test_x[:16, None].astype(np.float32))
    store.b.result.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), store.b.result.model(x).argmax(1))


def test_first_of_several_qualifying_runs_wins(store, mnist):
    target = min(store.a_acc + store.b_acc)  # both A and B qualify for one epoch
    result = P.promote("first-of-two", target=target, hold=1, mnist=mnist)
    assert result.run_id == store.a.run_id


def test_parent_run_id_restricts_the_candidates_to_its_children(store, mnist, capsys):
    target = min(store.a_acc + store.b_acc)  # A, the first, qualifies too
    client = MlflowClient()
    parent = client.create_run(client.get_experiment_by_name("main").experiment_id, run_name="confirm")
    client.set_terminated(parent.info.run_id)
    client.set_tag(store.b.run_id, "mlflow.parentRunId", parent.info.run_id)
    result = P.promote("only-children", target=target, hold=1, dry_run=True, mnist=mnist,
                       parent_run_id=parent.info.run_id)
    assert result.run_id == store.b.run_id
    assert P.main(["--parent-run-id", "0" * 32, "--dry-run"]) == 2  # unknown run
    assert P.main(["--parent-run-id", "x' OR '1", "--dry-run"]) == 2
    assert "--parent-run-id \"x' OR '1\" is not allowed" in capsys.readouterr().err


def test_a_confirm_parent_naming_its_champion_restricts_the_candidates_to_its_runs(store, mnist, capsys):
    """tracking.confirm tags its parent champion=<candidate> and each final run with its
    candidate: the champion's runs are promoted even when another candidate's held first."""
    target = min(store.a_acc + store.b_acc)  # A (first) and B both qualify
    client = MlflowClient()
    parent = client.create_run(client.get_experiment_by_name("main").experiment_id, run_name="confirm",
                               tags={"champion": "base"})
    client.set_terminated(parent.info.run_id)
    for run_id, candidate in ((store.a.run_id, "trial-3"), (store.b.run_id, "base")):
        client.set_tag(run_id, "mlflow.parentRunId", parent.info.run_id)
        client.set_tag(run_id, "confirm_candidate", candidate)
        client.set_tag(run_id, "confirm_role", "final")
    result = P.promote("champion-only", target=target, hold=1, dry_run=True, mnist=mnist,
                       parent_run_id=parent.info.run_id)
    assert result.run_id == store.b.run_id
    client.set_tag(parent.info.run_id, "champion", "trial-4")  # no run of it: none promoted
    with pytest.raises(P.NoCandidate, match=r"\(its champion trial-4\)"):
        P.promote("champion-only", target=target, hold=1, dry_run=True, parent_run_id=parent.info.run_id)
    client.set_tag(parent.info.run_id, "champion", "x' OR '1")  # written by someone else
    assert P.main(["--parent-run-id", parent.info.run_id, "--dry-run"]) == 2
    assert "tag champion=\"x' OR '1\" is not allowed: 'base' or 'trial-<number>'" in capsys.readouterr().err


def test_dry_run_registers_nothing(store, mnist):
    result = P.promote("dry", target=min(store.b_acc), hold=2, dry_run=True, mnist=mnist)
    assert result.dry_run and not result.created and result.version is None
    assert result.run_id == store.b.run_id
    assert versions("dry") == []


def test_promotion_is_idempotent_and_restores_the_alias(store, mnist):
    first = P.promote("again", target=min(store.b_acc), hold=2, mnist=mnist)
    MlflowClient().delete_registered_model_alias("again", "champion")
    second = P.promote("again", target=min(store.b_acc), hold=2, mnist=mnist)

    assert first.created and not second.created
    assert second.version == first.version
    assert len(versions("again")) == 1
    assert str(MlflowClient().get_model_version_by_alias("again", "champion").version) == first.version


@pytest.mark.slow
def test_two_simultaneous_promotions_register_one_version(store):
    cmd = [sys.executable, "-m", "tracking.promote", "--model-name", "race",
           "--target", str(min(store.b_acc)), "--hold", "2", "--from-experiment", "main"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(cmd, cwd=store.root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]  # two fresh interpreters on a busy machine

    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert sorted(out.split(":")[0] for out, _ in outs) == ["already promoted", "promoted"]
    found = versions("race")
    assert len(found) == 1 and found[0].run_id == store.b.run_id
    assert not list(store.root.glob("*.lock"))  # the registry decides, not a local lock


def test_a_promoter_that_lost_the_race_keeps_the_lowest_version_and_deletes_its_own(store, mnist):
    # The race, replayed in one process: another promoter registered the run between our
    # check and our create. Both versions exist for a moment; ours (the higher) goes.
    client = MlflowClient()
    registry.ensure_registered_model(client, "lost-race")
    cand, _ = P.select_run(client, P.experiment_ids(client, "main"), P.Criteria(min(store.b_acc), 2, 8000))
    other = client.create_model_version("lost-race", source=cand.model_uri, run_id=cand.run_id,
                                        model_id=cand.model_uri.removeprefix("models:/"))
    kept, created = P.register(client, "lost-race", cand, "champion")
    assert not created and str(kept.version) == str(other.version) == "1"
    found = versions("lost-race")
    assert [str(v.version) for v in found] == ["1"]
    champion = client.get_model_version_by_alias("lost-race", "champion")
    assert str(champion.version) == "1" and champion.tags["run_id"] == store.b.run_id


def test_no_qualifying_run_exits_1_and_lists_the_closest(store, capsys):
    # 98% for 2 epochs: only the over-budget run holds it, and its real model is too big.
    code = P.main(["--model-name", "none", "--target", "98", "--hold", "2",
                   "--from-experiment", "main"])

    err = capsys.readouterr().err
    assert code == 1
    assert "no FINISHED run in experiment 'main' held test_accuracy >= 98.0% for 2" in err
    for run_id in (store.over_budget_id, store.a.run_id, store.b.run_id):
        assert run_id in err
    assert "longest hold 2 epochs, best 99.00%" in err
    assert "logged model has" in err and "parameters > 8,000" in err
    assert versions("none") == []


def test_refuses_when_the_last_logged_accuracy_disagrees(store, mnist):
    # Untouched, the hand-logged copy of run A verifies: its model really scores that.
    ok = P.promote("tamper-ok", target=1, hold=1, experiment="tamper", dry_run=True, mnist=mnist)
    assert ok.verified_test_accuracy == pytest.approx(store.a_acc[-1], abs=0.05)

    MlflowClient().log_metric(store.tampered_id, "test_accuracy", 3.0, step=99)
    with pytest.raises(P.AccuracyMismatch, match=r"last logged test_accuracy is 3\.00%"):
        P.promote("tampered", target=1, hold=1, experiment="tamper", mnist=mnist)
    assert versions("tampered") == []


def test_a_failure_after_creating_the_version_deletes_it(store, mnist):
    # 'latest' is a reserved alias: MLflow refuses it only after the version exists.
    with pytest.raises(mlflow.exceptions.MlflowException, match="reserved"):
        P.promote("half", target=min(store.b_acc), hold=2, alias="latest", mnist=mnist)
    assert versions("half") == []


@pytest.mark.parametrize("argv, message", [
    (["--target", "0"], "--target 0.0 is not allowed: 0 < target <= 100"),
    (["--hold", "0"], "--hold 0 is not allowed"),
    (["--model-name", "it's"], "--model-name \"it's\" is not allowed"),
    (["--from-experiment", "nope"], "--from-experiment 'nope' does not exist; experiments:"),
])
def test_bad_arguments_exit_2_with_the_value_and_what_is_allowed(store, capsys, argv, message):
    assert P.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_run_whose_model_artifacts_are_gone_is_skipped_not_fatal(store):
    client = MlflowClient()
    client.create_experiment("lost", artifact_location=(store.root / "lost").as_uri())
    mlflow.set_experiment("lost")
    log_run_by_hand("lost", [99.5, 99.5], TinyNet(), count_params(TinyNet()))
    import shutil

    shutil.rmtree(store.root / "lost")  # someone cleaned up mlruns/ by hand
    for leftover in store.root.glob("**/models/*"):  # MLflow 3 keeps logged models apart
        if "lost" in str(leftover):
            shutil.rmtree(leftover)
    with pytest.raises(P.NoCandidate, match="logged model cannot be loaded"):
        P.promote("lost", target=99.4, hold=2, experiment="lost")


def test_target_hold_and_budget_are_the_experiment_files(tmp_path):
    stage3 = C.load(ROOT / "experiments/stage3.yaml")
    assert P.Criteria.of() == P.Criteria(stage3.target.accuracy, stage3.target.hold,
                                         stage3.model.max_params)
    (tmp_path / "small.yaml").write_text(f"extends: {ROOT / 'experiments/stage3.yaml'}\n"
                                         "target: {accuracy: 99.0, hold: 2}\nmodel: {max_params: 7000}\n")
    assert P.Criteria.of(tmp_path / "small.yaml") == P.Criteria(99.0, 2, 7000)
    assert P.Criteria.of(tmp_path / "small.yaml", target=98.5) == P.Criteria(98.5, 2, 7000)
    assert P.Criteria(99.0, 2, 7000).over_budget(7001) and not P.Criteria(99.0, 2, None).over_budget(10**6)
    # the criteria's file and a filter: not --config (a search file elsewhere) nor --experiment
    args = P.parser().parse_args(["--stage-config", str(tmp_path / "small.yaml"), "--from-experiment", "e"])
    assert (args.config, args.experiment) == (str(tmp_path / "small.yaml"), "e")


# ---------------------------------------------------------------- a store others can write to

class Evil(torch.nn.Module):
    """A model whose pickle runs code when it is loaded: it writes `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from the store ran')",)


def foreign_model(folder) -> torch.nn.Module:
    """A model of a package the promoter does not have (it existed only where it was logged)."""
    (folder / "otherteam.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(784, 10)\n")
    sys.path.insert(0, str(folder))
    try:
        import otherteam

        return otherteam.Net()
    finally:
        sys.path.remove(str(folder))


def test_promotion_runs_no_code_from_the_store_and_skips_what_it_cannot_verify(store, tmp_path, capsys):
    # Two runs before ours hold 99.5% for 5 epochs: one forges our tag and config over a pickle
    # that runs code, one is another team's ordinary model. Ours, a copy of run B, comes last.
    client = MlflowClient()
    client.create_experiment("hostile", artifact_location=(store.root / "hostile").as_uri())
    mlflow.set_experiment("hostile")
    marker = tmp_path / "pwned"
    evil = log_run_by_hand("evil", [99.5] * 5, Evil(str(marker)), 100, small_config(1).model)
    other = log_run_by_hand("other-team", [99.5] * 5, foreign_model(tmp_path), 7850, tags={})
    sys.modules.pop("otherteam")
    ours = log_run_by_hand("ours", store.b_acc, store.b.result.model,
                           count_params(store.b.result.model), small_config(2).model)
    capsys.readouterr()

    code = P.main(["--model-name", "hostile", "--target", str(min(store.b_acc)), "--hold", "2",
                   "--from-experiment", "hostile", "--dry-run"])

    out, err = capsys.readouterr()
    assert not marker.exists()
    assert code == 0, err
    assert f"dry run: would register run {ours}" in out
    skipped = [line for line in err.splitlines() if line.startswith("skipped run")]
    assert len(skipped) == 2, err
    assert skipped[0].startswith(f"skipped run {evil} (evil): cannot be verified: logged model is "
                                 "refused by torch's weights-only loader")
    assert "exec" in skipped[0]
    assert skipped[1] == (f"skipped run {other} (other-team): cannot be verified: not logged by "
                          "this project (no tag made_by=mnist-mlflow)")


def test_a_registered_model_of_another_team_is_refused_and_left_alone(store, capsys):
    client = MlflowClient()
    client.create_registered_model("theirs")  # not ours: no made_by tag
    cand, _ = P.select_run(client, P.experiment_ids(client, "main"), P.Criteria(min(store.b_acc), 2, 8000))
    client.create_model_version("theirs", source=cand.model_uri, run_id=store.a.run_id)
    client.set_registered_model_alias("theirs", "champion", "1")
    capsys.readouterr()

    for dry in ([], ["--dry-run"]):
        code = P.main(["--model-name", "theirs", "--target", str(min(store.b_acc)), "--hold", "2",
                       "--from-experiment", "main", *dry])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("error: registered model 'theirs' exists and was not created by this "
                              "project (no tag made_by=mnist-mlflow)") and err.count("\n") == 1
    assert [str(v.version) for v in versions("theirs")] == ["1"]
    assert str(client.get_model_version_by_alias("theirs", "champion").version) == "1"


KILLED_AFTER_CREATE = """
import os
from mlflow import MlflowClient
from tracking import promote as P

create = MlflowClient.create_model_version
def create_then_die(self, *args, **kwargs):  # SIGKILL right after the version exists
    create(self, *args, **kwargs)
    os._exit(9)
MlflowClient.create_model_version = create_then_die
P.main(["--model-name", "killed", "--target", os.environ["TARGET"], "--hold", "2",
        "--from-experiment", "main"])
"""


@pytest.mark.slow
def test_a_promotion_killed_after_creating_the_version_leaves_it_tagged(store, mnist):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "TARGET": repr(min(store.b_acc)),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_CREATE], cwd=store.root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    [version] = versions("killed")
    assert version.tags["run_id"] == store.b.run_id and version.tags["hold_epochs"] == "2"

    result = P.promote("killed", target=min(store.b_acc), hold=2, mnist=mnist)  # the rerun
    assert not result.created and result.version == str(version.version)
    assert str(MlflowClient().get_model_version_by_alias("killed", "champion").version) == "1"


def test_a_rerun_completes_a_version_an_older_promoter_left_without_tags(store, mnist):
    client = MlflowClient()
    registry.ensure_registered_model(client, "untagged")
    cand, _ = P.select_run(client, P.experiment_ids(client, "main"), P.Criteria(min(store.b_acc), 2, 8000))
    client.create_model_version("untagged", source=cand.model_uri, run_id=cand.run_id,
                                model_id=cand.model_uri.removeprefix("models:/"))
    client.set_model_version_tag("untagged", "1", "hold_epochs", "7")  # one it has stays

    result = P.promote("untagged", target=min(store.b_acc), hold=2, mnist=mnist)

    assert not result.created and result.version == "1"
    champion = client.get_model_version_by_alias("untagged", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["run_id"] == store.b.run_id and champion.tags["hold_epochs"] == "7"
    assert float(champion.tags["best_test_accuracy"]) == pytest.approx(max(store.b_acc))
    assert float(champion.tags["held_test_accuracy"]) == pytest.approx(min(store.b_acc))
    assert champion.tags["num_params"] == str(count_params(store.b.result.model))
