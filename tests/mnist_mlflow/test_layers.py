import pytest
import torch

from mnist_mlflow.layers import ChannelsLastConv2d, ChannelsLastMaxPool2d, SparseMaskDropout


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
