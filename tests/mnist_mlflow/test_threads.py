import json
import os
import subprocess
import sys

import pytest
import torch

from mnist_mlflow import config as C
from mnist_mlflow import threads as T
from mnist_mlflow.train import fit
from tests.conftest import ROOT


def test_threads_is_a_config_value_auto_by_default():
    assert C.RunConfig().threads == "auto" and C.flatten(C.RunConfig())["threads"] == "auto"
    assert C.from_dict({}, {"threads": 2}).threads == 2
    for bad in (0, -1, "two", 1.5, True, None):
        with pytest.raises(C.ConfigError, match="threads="):
            C.from_dict({}, {"threads": bad})


def test_an_explicit_count_is_honoured_exactly(mnist, tiny_config):
    from mnist_mlflow.data import make_splits

    splits = make_splits(mnist, train_limit=64, test_limit=64)
    for n in (2, 1):  # whatever the machine's load or cores
        result = fit(C.replace(tiny_config, {"threads": n, "optim.epochs": 1}), splits, progress=False)
        assert result.threads == n and torch.get_num_threads() == n


@pytest.mark.parametrize("cores, busy, expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1), (2, None, 2),
    (8, 1.0, 7), (8, 2.6, 5), (1, 0.0, 1)])
def test_auto_leaves_the_cores_that_others_keep_busy(monkeypatch, cores, busy, expected):
    monkeypatch.setattr(T, "usable_cores", lambda: cores)
    monkeypatch.setattr(T, "busy_cores", lambda sample_s=T.SAMPLE_S: busy)
    assert T.resolve("auto") == expected
    assert T.resolve(3) == 3  # an int never looks at the load


def test_auto_never_exceeds_omp_num_threads_or_the_affinity(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert T.usable_cores() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= T.usable_cores() <= len(os.sched_getaffinity(0))
    busy = T.busy_cores(0.1)
    assert busy is not None and 0.0 <= busy <= len(os.sched_getaffinity(0)) + 1e-9


def test_a_pinned_auto_is_a_search_workers_share(monkeypatch):
    monkeypatch.setattr(T, "_pinned_auto", None)
    T.pin_auto(3)
    assert T.resolve("auto") == 3 and T.resolve(1) == 1
    T.pin_auto(None)


TODAY = """
import json, sys
from mnist_mlflow import config as C, train
from mnist_mlflow.data import load_mnist, make_splits
train.apply_threads = lambda n: None  # the code before the setting: torch's own default count
cfg = C.from_dict({}, json.loads(sys.argv[1]))
splits = make_splits(load_mnist(), train_limit=512, test_limit=256)
print(json.dumps([m.test_loss for m in train.fit(cfg, splits, progress=False).history]))
"""


@pytest.mark.slow
def test_a_set_count_gives_the_metrics_of_torchs_default_with_that_count(mnist, tiny_config):
    # OMP_NUM_THREADS=1 is how that count was chosen before the setting existed
    from mnist_mlflow.data import make_splits

    cfg = C.replace(tiny_config, {"threads": 1, "data.train_limit": 512, "data.test_limit": 256})
    overrides = {k: v for k, v in C.flatten(cfg).items()}
    out = subprocess.run([sys.executable, "-c", TODAY, json.dumps(overrides)], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    before = json.loads(out.stdout.strip().splitlines()[-1])
    now = [m.test_loss for m in fit(cfg, make_splits(mnist, train_limit=512, test_limit=256),
                                    progress=False).history]
    assert now == before
