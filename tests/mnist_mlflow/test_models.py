import pytest
import torch

from mnist_mlflow.config import ModelConfig
from mnist_mlflow.models import (BudgetError, ChannelsLastConv2d, ChannelsLastMaxPool2d, SparseMaskDropout, TinyNet,
                                 WordMaskDropout, build_model,
                                 count_params, format_summary, layer_summary, param_count_of)


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


def test_receptive_field_against_a_hand_computed_case():
    rows = layer_summary(TinyNet(8, 16))
    rf = {r.name: r.receptive_field for r in rows}
    # 3x3 -> 3, 3x3 -> 5, pool(2) -> 6, 1x1 -> 6, then jump 2: 3x3 -> 10, 14, 18
    assert [rf["features.1.0"], rf["features.2.0"], rf["features.3"], rf["features.4.0"],
            rf["features.5.0"], rf["features.6.0"], rf["features.7.0"]] == [3, 5, 6, 6, 10, 14, 18]
    assert rows[-1].output_shape == (10,)
    assert "total parameters: 7,442" in format_summary(rows)


def test_normalization_lives_inside_the_model():
    model = TinyNet()
    assert {"features.0.mean", "features.0.std"} <= set(model.state_dict())


def test_word_mask_dropout_drops_at_rate_p_scales_and_routes_gradients():
    drop = WordMaskDropout(0.05).train()
    x = torch.ones(64, 16, 24, 24, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float()
    assert abs(dropped.mean().item() - 0.049988) < 0.002  # about 590k draws
    # every 16-bit lane of a word is used: no position in the groups of four is starved
    lanes = dropped.flatten().view(-1, 4).mean(0)
    assert torch.all((lanes - 0.05).abs() < 0.004), lanes
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - 1638 / 2**15)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = mask * scale
    assert torch.equal(drop.eval()(x), x)


def test_word_mask_dropout_follows_the_torch_seed():
    drop = WordMaskDropout(0.05).train()
    x = torch.ones(4, 9, 26, 26)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))
    assert not torch.equal(a, drop(x))


@pytest.mark.parametrize("draws", [None, 7])  # 7: many batches of gaps per call
def test_sparse_mask_positions_are_an_iid_bernoulli_p_sample(draws):
    torch.manual_seed(0)
    n, drop = 400_000, SparseMaskDropout(0.05)
    positions = drop.dropped_positions(n, draws) if draws is None else torch.cat(
        [drop.dropped_positions(2_000, draws) + 2_000 * i for i in range(n // 2_000)])
    assert positions.dtype == torch.int64 and positions.min() >= 0 and positions.max() < n
    assert torch.all(positions.diff() > 0)  # sorted, no repeats
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True
    assert abs(mask.float().mean().item() - 0.05) < 0.002  # sd 0.00034
    # independence: neighbours dropped together at rate p**2, and no position class is favoured
    assert abs((mask[1:] & mask[:-1]).float().mean().item() - 0.0025) < 0.0004
    assert torch.all((mask.view(-1, 8).float().mean(0) - 0.05).abs() < 0.004)
    assert drop.dropped_positions(0).numel() == 0 and drop.dropped_positions(1, draws=1).numel() <= 1


def test_sparse_mask_dropout_scales_routes_gradients_and_keeps_the_layout():
    drop = SparseMaskDropout(0.05).train()
    x = torch.ones(64, 9, 26, 26).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(1)
    y = drop(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert abs((y == 0).float().mean().item() - 0.05) < 0.003
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.95))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = mask * scale
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # the torch seed decides the mask
    assert not torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)


def test_channel_dropout_drops_whole_feature_maps_in_every_block():
    model = build_model(ModelConfig(dropout_mask="channel", channels_last_conv=True, pool_before_bn=True))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout2d)]
    assert len(drops) == 6 and all(d.p == 0.05 for d in drops)
    assert count_params(model) == 7759
    torch.manual_seed(0)
    y = drops[0].train()(torch.ones(512, 9, 26, 26))
    maps = y.flatten(2)
    dropped = (maps == 0).all(2)
    assert torch.equal(dropped, (maps == 0).any(2))  # a map is dropped whole or not at all
    assert abs(dropped.float().mean().item() - 0.05) < 0.01  # 4,608 maps
    assert torch.allclose(maps[~dropped], torch.full_like(maps[~dropped], 1 / 0.95))


def test_lean_net_keeps_the_receptive_field_with_fewer_multiply_adds():
    lean = build_model(ModelConfig(arch="lean", width1=8, width2=16, dropout_mask="words16"))
    # convs 72+576+1152+2304+2304, BN 2*(8+8+16+16+16), head 160+10
    assert count_params(lean) == 6408 + 128 + 170 == 6706
    rows = layer_summary(lean)
    assert rows[-1].output_shape == (10,)
    rf = {r.name: r.receptive_field for r in rows}
    assert [rf[f"features.{i}.0"] for i in (1, 2, 4, 5, 6)] == [3, 5, 10, 14, 18]
    assert sum(isinstance(m, WordMaskDropout) for m in lean.modules()) == 5


def test_channels_last_conv_matches_conv2d_in_values_gradients_and_layout():
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(9, 17, 3, bias=False)
    fast = ChannelsLastConv2d(9, 17, 3, bias=False)
    fast.load_state_dict(plain.state_dict())
    x1 = torch.randn(4, 9, 26, 26, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = plain(x1), fast(x2)
    assert y2.is_contiguous() and torch.allclose(y1, y2, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert x2.grad.is_contiguous() and torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(plain.weight.grad, fast.weight.grad, atol=1e-4)


def test_channels_last_pool_gives_maxpools_values_and_gradients():
    x1 = torch.relu(torch.randn(4, 16, 24, 24)).requires_grad_()  # ReLU's zeros: ties
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = torch.nn.MaxPool2d(2)(x1), ChannelsLastMaxPool2d(2)(x2)
    assert y2.is_contiguous() and torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert x2.grad.is_contiguous()
    nonzero = x1.detach() > 0  # a tie of zeros may route its gradient to another zero
    assert torch.equal(x1.grad[nonzero], x2.grad[nonzero])


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
