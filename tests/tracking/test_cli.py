"""The command-line layer (tracking/cli.py) as the entry points use it: typed flags, unset
values, one-line errors, and MLproject's entry points."""

from __future__ import annotations

import shlex

import pytest
import yaml

from mnist_mlflow import config as C
from tests.conftest import ROOT
from tests.mnist_mlflow.test_data import write_idx_dir
from tracking import cli, promote, stage

STAGE3 = str(ROOT / "experiments/stage3.yaml")
MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def test_typed_flags_reach_the_config_as_values_never_as_text():
    args = stage.parser().parse_args([STAGE3, "--data-dir", "2024", "--seed", "7", "--epochs", "3",
                                      "--set", "optim.lr=0.02 data.val_size=100"])
    assert cli.overrides(args) == {"data.data_dir": "2024", "seed": 7, "optim.epochs": 3,
                                   "optim.lr": 0.02, "data.val_size": 100}
    assert C.load(STAGE3, cli.overrides(args)).data.data_dir == "2024"  # was "not a string"


def test_a_data_dir_named_like_a_number_trains(tracking_uri, tmp_path, mnist, capsys):
    (tmp_path / "2024").mkdir()  # the tracking_uri fixture made tmp_path the working folder
    write_idx_dir(tmp_path / "2024", mnist)
    assert stage.main([STAGE3, "--data-dir", "2024", "--epochs", "1", "--check"]) == 0
    assert capsys.readouterr().out.startswith("ok: stage3")


def test_empty_values_are_unset_and_bad_ones_are_one_line(capsys):
    args = stage.parser().parse_args([STAGE3, "--epochs", "", "--seed", "", "--train-limit", "",
                                      "--test-limit", "", "--data-dir", "", "--set", ""])
    assert cli.overrides(args) == {}
    with pytest.raises(C.ConfigError, match=r"^--epochs='two' is not an integer$"):
        stage.parser().parse_args([STAGE3, "--epochs", "two"])
    assert stage.main([STAGE3, "--seed", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seed='1.5' is not an integer"]


@pytest.mark.parametrize("kind, text, expected", [
    (int, "", None), (int, "3", 3), (float, "0.5", 0.5), (str, "2024", "2024"),
    (bool, "false", False), (bool, "Yes", True), (bool, "", None),
])
def test_value(kind, text, expected):
    assert cli.value("x", text, kind) == expected


@pytest.mark.parametrize("kind, text, minimum, message", [
    (int, "1.5", None, "--x='1.5' is not an integer"),
    (float, "a", None, "--x='a' is not a number"),
    (int, "0", 1, "--x='0' is not allowed: 1 or more"),
    (bool, "maybe", None, "--x='maybe' is not allowed: true or false"),
])
def test_bad_values_name_the_flag(kind, text, minimum, message):
    with pytest.raises(C.ConfigError, match=f"^{message}"):
        cli.value("x", text, kind, minimum)


def test_the_stage_entries_share_their_parameters_and_differ_only_in_the_file():
    stages = {name: MLPROJECT[name] for name in ("stage1", "stage2", "stage3")}
    assert stages["stage1"]["parameters"] is stages["stage2"]["parameters"] is stages["stage3"]["parameters"]
    commands = {name: e["command"].replace(f"experiments/{name}.yaml", "FILE") for name, e in stages.items()}
    assert len(set(commands.values())) == 1


@pytest.mark.parametrize("entry", ["stage1", "stage2", "stage3", "main", "promote"])
def test_mlproject_entries_parse_with_every_default(entry):
    spec = MLPROJECT[entry]
    params = spec.get("parameters", {})
    argv = shlex.split(spec["command"].format(**{k: shlex.quote(str(v["default"])) for k, v in params.items()}))
    module = {"tracking.stage": stage, "tracking.promote": promote}[argv[2]]
    args = module.parser().parse_args(argv[3:])
    if module is stage:
        assert cli.overrides(args) == ({"seed": 1} if params else {})
    else:  # the experiment file's target and hold
        assert (args.target, args.hold, args.dry_run) == (None, None, False)


def test_one_table_writer_for_every_command():
    """report, report --tune, confirm and noise print their tables with it: flags, floats, gaps."""
    rows = [{"candidate": "base", "held": True, "hold_epoch": None, "final": 99.4567, "curve": [1.0]},
            {"candidate": "t1", "held": False, "hold_epoch": 7, "final": float("nan"), "curve": [2.0]}]
    assert cli.markdown(rows) == ("| candidate | held | hold_epoch | final |\n|---|---|---|---|\n"
                                  "| base | yes |  | 99.46 |\n| t1 | no | 7 |  |")
    assert cli.markdown([]) == ""
