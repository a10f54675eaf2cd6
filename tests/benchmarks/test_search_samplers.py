"""benchmarks/search_samplers.py: each sampler:pruner pair searches as its own cold-start study."""

import optuna
import yaml

from benchmarks import search_samplers
from tests.conftest import ROOT
from tracking.search.space import load_search

TINY = ["--minutes", "5", "--n-trials", "2", "--workers", "1", "--epochs", "2", "--train-limit", "400",
        "--test-limit", "200", "--set", "data.val_size=200 device=cpu optim.batch_size=32 optim.ema_decay=0.9"]


def test_each_pair_is_its_own_cold_study_with_only_its_sampler_and_pruner_changed(tracking_uri, mnist, capsys):
    storage = "sqlite:///samplers.db"
    assert search_samplers.main(["--combos", "random:median,tpe:hyperband", "--storage", storage, *TINY]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("| sampler:pruner | studies"):]
    rows = [line for line in summary.splitlines() if line.startswith(("| random:median", "| tpe:hyperband"))]
    assert len(rows) == 2 and rows[0].split(" | ")[3] == "1.000"  # the first pair against itself
    per_study = [line for line in out[:out.index(summary)].splitlines() if line.startswith("| tpe:hyperband | 1 |")]
    cells = per_study[0].split(" | ")
    assert len(per_study) == 1 and cells[5] == "2" and cells[3] in {"0", "1"}  # its trials, the best's number
    assert "one study per combination, so no difference" in out  # one repeat: no noise estimate
    for name in ("samplers-random-median-r1", "samplers-tpe-hyperband-r1"):
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 2 and not any(t.user_attrs.get("incumbent") for t in trials)  # cold

    # --report rebuilds the same document from the storage, training nothing
    document = out[out.index("<!-- generated"):].strip().split("\n", 1)[1]  # after the command line
    assert search_samplers.main(["--report", "--combos", "random:median,tpe:hyperband", "--storage", storage,
                                 "--out", "samplers.md", *TINY]) == 0
    command, reported = capsys.readouterr().out.strip().split("\n", 1)
    assert reported == document and open("samplers.md").read().strip() == f"{command}\n{reported}"
    assert "--report --combos random:median,tpe:hyperband" in command and "--out samplers.md" in command
    assert len(optuna.load_study(study_name="samplers-tpe-hyperband-r1", storage=storage).trials) == 2

    # the same command again skips the studies that ran to their end
    assert search_samplers.main(["--combos", "random:median,tpe:hyperband", "--storage", storage, *TINY]) == 0
    assert capsys.readouterr().out.count(f"already in {storage}, skipped") == 2
    assert len(optuna.load_study(study_name="samplers-random-median-r1", storage=storage).trials) == 2


def test_a_study_cut_off_is_deleted_to_run_again(tmp_path):
    storage = f"sqlite:///{tmp_path / 'samplers.db'}"
    study = optuna.create_study(study_name="samplers-gp-median-r1", storage=storage)
    study.ask()  # left RUNNING, as when the machine stopped
    assert not search_samplers.finished(storage, "samplers-gp-median-r1")
    assert "samplers-gp-median-r1" not in optuna.get_all_study_names(storage)
    done = optuna.create_study(study_name="samplers-gp-median-r2", storage=storage)
    done.set_user_attr(search_samplers.DONE, True)
    assert search_samplers.finished(storage, "samplers-gp-median-r2")
    assert not search_samplers.finished(storage, "samplers-absent-r1")


SAMPLE = {"best_trial": None, "first_hold_min": None, "span_min": 7.0, "epochs_trained": 10, "epochs_per_hour": 500.0,
          "COMPLETE": 1, "PRUNED": 0, "STOPPED": 0, "REJECTED": 0, "FAIL": 0, "SURPLUS": 0, "RUNNING": 0}


def test_the_noise_is_the_spread_between_repeats_of_one_pair():
    rows = lambda *bests: [{"best": b} for b in bests]  # noqa: E731
    sd, dof = search_samplers.noise({("tpe", "median"): rows(10.0, 12.0), ("gp", "median"): rows(11.0, 11.0),
                                     ("random", "median"): rows(13.0)})
    assert dof == 2 and abs(sd - 1.0) < 1e-12  # (2 + 0) / 2, the single study adds nothing
    assert search_samplers.noise({("tpe", "median"): rows(10.0)}) == (None, 0)
    text = search_samplers.document({("tpe", "median"): [dict(SAMPLE, best=10.0), dict(SAMPLE, best=12.0)],
                                     ("gp", "median"): [dict(SAMPLE, best=11.0)]}, "tiny", [])
    assert "of 1 study each, more than 1.96 x sd x sqrt(2/1) = 3.92" in text  # sd sqrt(2)
    assert "of 2 studies each, more than 1.96 x sd x sqrt(2/2) = 2.77" in text


def test_a_report_of_a_missing_storage_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert search_samplers.main(["--report", "--storage", "sqlite:///nothing.db"]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "nothing.db").exists()


def test_the_written_search_file_differs_from_the_default_only_in_sampler_and_pruner(tmp_path):
    base = ROOT / "experiments/search.yaml"
    spec = load_search(search_samplers.search_file(tmp_path, base, "gp", "hyperband"))
    default = load_search(base)
    assert spec.base == default.base and spec.space == default.space
    assert spec.settings.sampler == {**default.settings.sampler, "name": "gp"}
    shorter = load_search(search_samplers.search_file(tmp_path, base, "tpe", "median", startup=3))
    assert shorter.settings.sampler == {**default.settings.sampler, "name": "tpe", "n_startup_trials": 3}
    assert spec.settings.pruner == {"name": "hyperband", "min_resource": 4, "reduction_factor": 3}
    assert yaml.safe_load((tmp_path / "search-gp-hyperband.yaml").read_text())["extends"] == str(
        ROOT / "experiments/stage3.yaml")


def test_an_unknown_pair_is_refused_before_any_study(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert search_samplers.main(["--combos", "tpe:median,cmaes:median"]) == 2
    assert "'cmaes:median' is not sampler:pruner" in capsys.readouterr().err
    assert not (tmp_path / "samplers.db").exists()
