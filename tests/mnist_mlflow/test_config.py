import re

import pytest

from mnist_mlflow import config as C
from tests.conftest import ROOT


def test_stage_files_load_and_differ_only_where_declared():
    s3 = C.load(ROOT / "experiments/stage3.yaml")
    assert s3.augment.rotation_degrees == 6.9
    assert s3.schedule.name == "onecycle" and s3.model.dropout == 0.05
    assert C.load(ROOT / "experiments/stage1.yaml").model.arch == "barebone"


def test_overrides_use_dotted_paths_and_yaml_scalars():
    cfg = C.load(ROOT / "experiments/stage3.yaml", ["optim.lr=0.02", "schedule.name=step", "data.train_limit=null"])
    assert cfg.optim.lr == 0.02 and cfg.schedule.name == "step" and cfg.data.train_limit is None


def test_flatten_round_trips_through_overrides():
    cfg = C.load(ROOT / "experiments/stage2.yaml")
    flat = C.flatten(cfg)
    assert flat["model.max_params"] == 8000 and flat["stage"] == "stage2"
    assert C.from_dict({}, flat) == cfg


@pytest.mark.parametrize("override, message", [
    ("schedule.name=cyclic", "schedule.name='cyclic' is not allowed: one of none, onecycle, step, cosine"),
    ("optim.epochs=-1", "optim.epochs=-1 is not allowed"),
    ("model.dropout=1.0", "model.dropout=1.0 is not allowed"),
    ("augment.rotation_degrees=-5", "augment.rotation_degrees=-5.0 is not allowed"),
    ("optim.batch_size=abc", "optim.batch_size='abc' is not allowed: an integer"),
    ("optim.lrr=0.1", "unknown key 'optim.lrr'"),
    ("optim.nesterov=true", "optim.nesterov=True is not allowed: true only with optim.name=sgd and "
                            "optim.momentum > 0"),  # stage 3 is Adam
    ("nonsense", "must look like section.key=value"),
    ("seed=99999999999999999999", "seed=99999999999999999999 is not allowed: an integer from 0 to 4294967295"),
    ("data.split_seed=-1", "data.split_seed=-1 is not allowed: an integer from 0 to 4294967295"),
])
def test_bad_values_name_the_value_and_what_is_allowed(override, message):
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.load(ROOT / "experiments/stage3.yaml", [override])


@pytest.mark.parametrize("override, allowed, what", [
    ("model.arch=lean", "tiny, barebone", "lean (LeanNet)"),
    ("model.dropout_mask=words16", "bernoulli, sparse", "words16 (WordMaskDropout)"),
    ("model.dropout_mask=channel", "bernoulli, sparse", "channel (the channel mask, nn.Dropout2d)"),
])
def test_retired_variants_are_refused_naming_the_tag_that_keeps_them(override, allowed, what):
    with pytest.raises(C.ConfigError, match=re.escape(
            f"is not allowed: one of {allowed}; {what} was retired and is kept in git tag "
            "retired-variants (commit 2e95a01)")):
        C.load(ROOT / "experiments/stage3.yaml", [override])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")


def test_a_file_extends_another_relative_to_itself_and_overrides_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("stage: base\noptim: {epochs: 7, batch_size: 64}\n")
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\nstage: child\noptim: {epochs: 3}\n")
    cfg = C.load(tmp_path / "sub" / "child.yaml", ["optim.batch_size=32"])
    assert (cfg.stage, cfg.optim.epochs, cfg.optim.batch_size) == ("child", 3, 32)


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "cycle"),
    ({"a.yaml": "extends: missing.yaml\n"}, "missing.yaml' does not exist"),
    ({"a.yaml": "extends: 3\n"}, "extends=3 is not allowed"),
    ({"a.yaml": "- 1\n- 2\n"}, "must hold a mapping of settings"),
])
def test_bad_extends_is_a_config_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(C.ConfigError, match=message):
        C.load(tmp_path / "a.yaml")


def test_differences_hold_only_what_differs():
    base = C.load(ROOT / "experiments/stage3.yaml")
    changed = C.replace(base, {"optim.epochs": 9, "data.val_size": 100})
    assert C.differences(changed, base) == {"optim": {"epochs": 9}, "data": {"val_size": 100}}
    assert C.differences(changed, base, skip=("data.",)) == {"optim": {"epochs": 9}}


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: [0.1\n", r"bad.yaml', line 3: not valid YAML"),
    ("- optim.lr: 0.1\n", "bad.yaml' must hold a mapping of settings, not a list"),
    ("seed: !!python/object/apply:os.system ['touch pwned']\n", r"bad.yaml', line 1: not valid YAML"),
])
def test_yaml_errors_name_the_file_and_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(C.ConfigError, match=message):
        C.load(tmp_path / "bad.yaml")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text, message", [
    # merged silently, this gave the default 15 epochs and batch size 64
    ("optim: {epochs: 3}\nseed: 1\noptim: {batch_size: 64}\n",
     r"bad.yaml', line 3: not valid YAML \(duplicate key 'optim', first on line 1\)"),
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", r"bad.yaml', line 3: not valid YAML \(duplicate key 'lr', first on line 2\)"),
    ("optim: {lr: 0.1, lr: 0.2}\n", r"bad.yaml', line 1: not valid YAML \(duplicate key 'lr', first on line 1\)"),
])
def test_duplicate_keys_are_refused_naming_the_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(C.ConfigError, match=message):
        C.load(tmp_path / "bad.yaml")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    text = "optim:\n  <<: {epochs: 3, batch_size: 64}\n  epochs: 4\n"
    (tmp_path / "ok.yaml").write_text(text)
    config = C.load(tmp_path / "ok.yaml")
    assert (config.optim.epochs, config.optim.batch_size) == (4, 64)


def test_a_directory_as_config_is_named_as_such(tmp_path):
    with pytest.raises(C.ConfigError, match="is a directory, not a YAML file"):
        C.load(tmp_path)


@pytest.mark.parametrize("override", ["schedule.max_lr=.inf", "optim.lr=.nan", "optim.weight_decay=-.inf",
                                      "target.accuracy=.NaN", "optim.ema_decay=.nan"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(C.ConfigError, match="is not allowed: a finite number"):
        C.load(ROOT / "experiments/stage3.yaml", [override])


def test_an_override_that_is_not_yaml_is_a_config_error():
    with pytest.raises(C.ConfigError, match="optim.lr=\\[0.1.*not a YAML scalar"):
        C.load(ROOT / "experiments/stage3.yaml", ["optim.lr=[0.1"])
