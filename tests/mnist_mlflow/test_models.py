import pytest
import torch

from mnist_mlflow.config import ModelConfig
from mnist_mlflow.models import (MAX_BATCH, BudgetError, TinyNet, build_model, count_params,
                                 param_count_of)
from mnist_mlflow.summary import layer_summary


def test_param_count_matches_a_hand_count():
    # w1=8, w2=16: convs 72+1152+128+1152+2304+2304, BN 2*(8+16+8+16+16+16), head 160+10
    assert count_params(TinyNet(8, 16)) == 7272 + 160 + 170 - 160 == 7442


def test_default_tiny_net_is_within_budget_and_contract():
    model = build_model(ModelConfig())
    assert count_params(model) <= 8000
    out = model.eval()(torch.full((3, 1, 28, 28), 255.0))
    assert out.shape == (3, 10)


def test_over_budget_fails_at_construction_naming_count_and_budget():
    with pytest.raises(BudgetError, match="8,076 parameters, over the budget of 8,000"):
        build_model(ModelConfig(width1=10, width2=16))
    assert param_count_of(ModelConfig(width1=10, width2=16)) == 8076


@pytest.mark.parametrize("pool_before_bn", [False, True])
def test_layers_draw_their_initial_weights_in_forward_order(pool_before_bn):
    """What keeps a seed's initial weights (and so its run) the same when the code is rearranged."""
    torch.manual_seed(0)
    model = TinyNet(pool_before_bn=pool_before_bn, channels_last=pool_before_bn)
    torch.manual_seed(0)
    expected = [torch.nn.Conv2d(cin, cout, k, bias=False).weight
                for cin, cout, k in [(1, 9, 3), (9, 16, 3), (16, 9, 1), (9, 16, 3), (16, 16, 3), (16, 16, 3)]]
    convs = [m.weight for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and all(torch.equal(a, b) for a, b in zip(convs, expected))


def test_normalization_lives_inside_the_model():
    model = TinyNet()
    assert {"features.0.mean", "features.0.std"} <= set(model.state_dict())


def test_pool_before_bn_keeps_params_and_rf_and_channels_last_changes_only_speed():
    plain = build_model(ModelConfig(pool_before_bn=True, dropout=0.0))
    fast = build_model(ModelConfig(pool_before_bn=True, dropout=0.0, channels_last_conv=True))
    assert count_params(plain) == count_params(build_model(ModelConfig())) == 7759
    rows = layer_summary(plain)
    assert [r.output_shape for r in rows if r.name.startswith("features.2.")][:2] == [(16, 24, 24), (16, 12, 12)]
    assert rows[-1].receptive_field == 28 and max(r.receptive_field for r in rows[:-3]) == 18
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(8, 1, 28, 28) * 255
    out_plain, out_fast = plain(x), fast(x)  # training mode: batch statistics
    assert torch.allclose(out_plain, out_fast, atol=1e-4)
    out_plain.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-3, rtol=1e-3), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 256.0])
def test_an_evaluating_model_refuses_pixels_outside_the_contract(bad):
    model = build_model(ModelConfig()).eval()
    x = torch.full((2, 1, 28, 28), 100.0)
    x[1, 0, 5, 5] = bad
    with pytest.raises(ValueError, match="input pixels must be finite numbers in 0-255"):
        model(x)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # the edges of the range are fine
    model.train()(x.clamp(0, 255).nan_to_num(0.0))  # training batches are not checked (no sync)


def test_an_evaluating_model_refuses_images_scaled_to_0_1():
    """ToTensor's 0-1 images are near-black as raw pixels: every one came back as class 1."""
    model = build_model(ModelConfig()).eval()
    x = torch.full((3, 1, 28, 28), 200.0)
    x[2] = torch.rand(1, 28, 28)  # one image of the batch in 0-1
    with pytest.raises(ValueError, match=r"raw 0-255, not scaled to 0-1: 1 of 3 images .* image 2"):
        model(x)
    with pytest.raises(ValueError, match="not scaled to 0-1"):
        model(torch.ones(1, 1, 28, 28))
    x[2] = 0.0  # a blank image is the same in either scale
    x[1, 0, :, :] = 0.0
    x[1, 0, 3, 3] = 2.0  # one faint raw pixel is not a 0-1 image
    assert model(x).shape == (3, 10)


def test_an_evaluating_model_takes_at_most_max_batch_images_a_call():
    model = build_model(ModelConfig()).eval()
    with pytest.raises(ValueError, match=f"batch of 4,097 images is over the limit of {MAX_BATCH:,}"):
        model(torch.zeros(MAX_BATCH + 1, 1, 28, 28))
    with torch.no_grad():  # training (fine-tuning a loaded model) has no such limit
        assert model.train()(torch.zeros(MAX_BATCH + 1, 1, 28, 28)).shape == (MAX_BATCH + 1, 10)


def test_width6_adds_a_fourth_3x3_conv_that_reaches_rf_22_on_a_4x4_map():
    cfg = ModelConfig(width1=8, width2=14, width_transition=8, width3=14, width4=14, width5=14,
                      width6=14, pool_before_bn=True)
    model = build_model(cfg)
    # convs 72+1008+112+1008+1764*3, BN 2*(8+14+8+14*4), head 14*10+10
    assert count_params(model) == param_count_of(cfg) == 7814
    rows = layer_summary(model)
    convs = [r for r in rows if r.kind.endswith("Conv2d") and r.name.startswith("features.")]
    assert convs[-1].output_shape == (14, 4, 4) and convs[-1].receptive_field == 22
    assert model.eval()(torch.full((2, 1, 28, 28), 255.0)).shape == (2, 10)
    assert count_params(build_model(ModelConfig(width6=None))) == 7759  # null: stage 2's net
    with pytest.raises(BudgetError, match="width6=16"):
        build_model(ModelConfig(width6=16))
