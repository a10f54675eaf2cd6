import copy
import subprocess
import sys

import pytest
import torch

from mnist_mlflow import config as C
from mnist_mlflow.data import make_splits
from mnist_mlflow.explore import pixel_stats
from mnist_mlflow.train import fit, init_model, make_ema


def test_short_run_on_a_subset_learns(mnist, tiny_config):
    seen = []
    result = fit(tiny_config, make_splits(mnist, train_limit=2000, test_limit=500),
                 on_epoch_end=seen.append, progress=False)
    assert [m.epoch for m in seen] == [1, 2] and result.history == seen
    assert seen[-1].test_accuracy > 80.0  # chance is 10%
    assert seen[-1].epoch_seconds > 0 and seen[0].lr > 0


def test_same_seed_gives_identical_metrics(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"optim.epochs": 1, "augment.thickness_prob": 0.3})
    splits = make_splits(mnist, val_size=300, train_limit=600, test_limit=200)
    a = fit(cfg, splits, progress=False).history[0]
    b = fit(cfg, splits, progress=False).history[0]
    assert (a.train_loss, a.test_accuracy, a.val_accuracy) == (b.train_loss, b.test_accuracy, b.val_accuracy)


def test_bf16_trains_and_keeps_fp32_weights(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"precision": "bf16"})
    result = fit(cfg, make_splits(mnist, train_limit=2000, test_limit=500), progress=False)
    assert result.history[-1].test_accuracy > 80.0
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}


def test_without_a_model_fit_builds_the_runs_model(mnist, tiny_config):
    """Normalized with its training images' statistics, as a tracked run's (`init_model`)."""
    cfg = C.replace(tiny_config, {"optim.epochs": 1})
    splits = make_splits(mnist, train_limit=600, test_limit=200)
    built = fit(cfg, splits, progress=False)
    given = fit(cfg, splits, progress=False, model=init_model(cfg, splits.train_x)[0])
    normalize = built.model.features[0]
    assert (normalize.mean.item(), normalize.std.item()) == pytest.approx(pixel_stats(splits.train_x))
    assert [(m.train_loss, m.test_loss) for m in built.history] == \
        [(m.train_loss, m.test_loss) for m in given.history]


def test_epoch_callback_returning_true_stops_training(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"optim.epochs": 3})
    result = fit(cfg, make_splits(mnist, train_limit=300, test_limit=100),
                 on_epoch_end=lambda m: m.epoch == 1, progress=False)
    assert [m.epoch for m in result.history] == [1]


def test_ema_weights_are_evaluated_returned_and_resumed(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"optim.epochs": 3, "optim.ema_decay": 0.99})
    splits = make_splits(mnist, train_limit=600, test_limit=200)
    states = []
    full = fit(cfg, splits, progress=False, on_checkpoint=lambda s: states.append(copy.deepcopy(s)))
    plain = fit(C.replace(cfg, {"optim.ema_decay": None}), splits, progress=False)
    trained = states[-1]["model"]  # the optimizer's weights; the result is their average
    assert not torch.equal(full.model.state_dict()["head.1.weight"], trained["head.1.weight"])
    assert [h.train_loss for h in full.history] == [h.train_loss for h in plain.history]
    assert [h.test_loss for h in full.history] != [h.test_loss for h in plain.history]
    resumed = fit(cfg, splits, progress=False, resume_from=states[0])
    assert [h.test_loss for h in resumed.history] == [h.test_loss for h in full.history]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                  full.model.state_dict().values()))


def test_ema_is_bias_corrected_so_the_first_weights_do_not_linger():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = make_ema(model, 0.9)
    ema.update_parameters(model)  # step 1 copies: 0
    torch.nn.init.ones_(model.weight)
    for _ in range(4):  # steps 2-5: 1
        ema.update_parameters(model)
    # sum of 0.9**(5-i) * 0.1 * w_i over 1 - 0.9**5: (1 - 0.9**4) / (1 - 0.9**5); a plain EMA: 1 - 0.9**4
    assert ema.module.weight.item() == pytest.approx((1 - 0.9**4) / (1 - 0.9**5))


def test_weight_average_matches_averaged_models_own_update_bit_for_bit():
    """The cached update is AveragedModel's, with the same bias-corrected lerp: equal tensors,
    BatchNorm statistics and counters included, also after loading a state mid-way."""
    from torch.optim.swa_utils import AveragedModel

    def lerp(averaged, current, n):
        if not averaged[0].is_floating_point():
            return torch._foreach_copy_(averaged, current)
        torch._foreach_lerp_(averaged, current, (1 - 0.9) / (1 - 0.9 ** (int(n) + 1)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    ours, stock = make_ema(model, 0.9), AveragedModel(model, multi_avg_fn=lerp, use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        model(torch.randn(4, 1, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ours.update_parameters(model)
        stock.update_parameters(model)
        if step == 2:  # as on resume: a fresh average loaded from a state
            state = ours.state_dict()
            ours = make_ema(model, 0.9)
            ours.load_state_dict(state)
    assert ours.state_dict().keys() == stock.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), stock.state_dict().values()))
    assert int(ours.n_averaged) == 6


@pytest.mark.slow
def test_library_imports_neither_mlflow_nor_optuna():
    code = ("import importlib, pkgutil, sys, mnist_mlflow; "
            "[importlib.import_module(f'mnist_mlflow.{m.name}') for m in pkgutil.iter_modules(mnist_mlflow.__path__)]; "
            "print(sorted(m for m in ('mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_non_finite_loss_stops_training_naming_the_epoch(mnist, tiny_config):
    from mnist_mlflow.train import Diverged

    cfg = C.replace(tiny_config, {"schedule.name": "none", "optim.name": "sgd", "optim.lr": 1e30})
    seen = []
    with pytest.raises(Diverged, match=r"training diverged in epoch 1: train_loss=(nan|inf)"):
        fit(cfg, make_splits(mnist, train_limit=2000, test_limit=500), on_epoch_end=seen.append,
            progress=False)
    assert seen == []  # nothing of that epoch reaches the callbacks


def test_sgd_takes_nesterov_momentum_from_the_config(tiny_config):
    from mnist_mlflow.models import build_model
    from mnist_mlflow.train import make_optimizer

    cfg = C.replace(tiny_config, {"optim.name": "sgd", "optim.momentum": 0.8, "optim.nesterov": True})
    opt = make_optimizer(build_model(cfg.model), cfg)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.SGD
    assert (group["nesterov"], group["momentum"]) == (True, 0.8)
    with pytest.raises(C.ConfigError, match="optim.nesterov=True is not allowed"):
        C.replace(cfg, {"optim.momentum": 0.0})


def test_label_smoothing_trains_against_smoothed_targets_and_refuses_one(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"optim.epochs": 1})
    splits = make_splits(mnist, train_limit=600, test_limit=200)
    plain = fit(cfg, splits, progress=False).history[0]
    smooth = fit(C.replace(cfg, {"optim.label_smoothing": 0.1}), splits, progress=False).history[0]
    # smoothed targets keep the loss above the entropy of (0.9 + 0.01, 0.01 x 9): about 0.5 nats
    assert smooth.train_loss > plain.train_loss and smooth.train_loss > 0.5
    with pytest.raises(C.ConfigError, match="optim.label_smoothing=1.0 is not allowed: 0 <= label_smoothing < 1"):
        C.replace(cfg, {"optim.label_smoothing": 1.0})
