import torch

from mnist_mlflow.augment import augment_batch, dilate, erode, rotate
from mnist_mlflow.config import AugmentConfig


def _dot(row, col):
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, row, col] = 255.0
    return x


def _peak(x):
    flat = int(x[0, 0].argmax())
    return divmod(flat, 28)


def test_fixed_rotation_moves_a_bright_pixel_where_it_should():
    # centre is 13.5; a pixel 8 right of it turns counter-clockwise to 8 above it
    assert _peak(rotate(_dot(14, 22), torch.tensor([90.0]))) == (5, 14)
    assert _peak(rotate(_dot(14, 22), torch.tensor([-90.0]))) == (22, 13)
    assert _peak(rotate(_dot(14, 22), torch.tensor([180.0]))) == (13, 5)


def test_matches_torchvision_rotate():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(4, 1, 28, 28) * 255
    ours = rotate(x, torch.full((4,), 6.9))
    ref = TF.rotate(x, 6.9, interpolation=TF.InterpolationMode.BILINEAR)
    assert (ours - ref).abs().max() < 0.01


def test_strength_zero_is_the_identity():
    x = torch.rand(8, 1, 28, 28) * 255
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, AugmentConfig(0.0, 0.0), g), x)


def test_rotation_is_random_per_image_and_bounded():
    x = _dot(14, 22).repeat(64, 1, 1, 1)
    out = augment_batch(x, AugmentConfig(rotation_degrees=6.9), torch.Generator().manual_seed(0))
    assert len({_peak(o[None]) for o in out}) > 1  # different angles per image
    # 6.9 degrees moves a point 8 px from the centre by at most ~1 px
    assert all(abs(_peak(o[None])[0] - 14) <= 1 for o in out)


def test_thickness_changes_ink_and_keeps_labels():
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 10:18, 13:15] = 255.0
    assert (dilate(x) > 0).sum() > (x > 0).sum() > (erode(x) > 0).sum()
    labels = torch.tensor([3, 7])
    out = augment_batch(x, AugmentConfig(thickness_prob=1.0), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and labels.tolist() == [3, 7]
    assert not torch.equal(out, x)


def test_shift_moves_a_pixel_right_and_down_by_whole_pixels():
    out = rotate(_dot(14, 10), torch.zeros(1), torch.tensor([[3.0, -2.0]]))
    assert _peak(out) == (12, 13)
    assert (out.max() - 255.0).abs() < 1e-3  # a whole-pixel shift resamples exactly


def test_shift_is_random_per_image_bounded_and_off_by_default():
    x = _dot(14, 14).repeat(64, 1, 1, 1)
    out = augment_batch(x, AugmentConfig(translate_px=2.0), torch.Generator().manual_seed(0))
    # the ink's centre of mass moves by at most 2 px on each axis, differently per image
    grid = torch.arange(28.0)
    cy = (out[:, 0].sum(2) * grid).sum(1) / out[:, 0].sum((1, 2))
    cx = (out[:, 0].sum(1) * grid).sum(1) / out[:, 0].sum((1, 2))
    assert (cy - 14).abs().max() <= 2.0 + 1e-4 and (cx - 14).abs().max() <= 2.0 + 1e-4
    assert cx.std() > 0.5 and cy.std() > 0.5
    # without a shift the rotation draws the same angles as before the option existed
    a = augment_batch(x, AugmentConfig(rotation_degrees=6.9), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    b = rotate(x, (2 * torch.rand(64, generator=g) - 1) * 6.9)
    assert torch.equal(a, b)
