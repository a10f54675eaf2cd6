"""Preprocessing and the predict CLI (tracking/predict.py) on real MNIST digits re-encoded as 'photos'.

The 28x28 test digits are inverted (dark on light), enlarged 3-5x, put off-centre on a
larger canvas and saved as PNG and JPEG; preprocessing must bring them back to what the
model saw in training, so that it gives the same answer as for the originals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest

from mnist_mlflow import config as C
from mnist_mlflow import predict as PR
from mnist_mlflow import preprocess as PP
from tests.conftest import ROOT, use_fresh_store
from tracking import predict as predict_cli
from tracking.lifecycle.runs import run_training

# one worker under pytest-xdist (--dist loadgroup): the module-scoped model is trained once
pytestmark = pytest.mark.xdist_group("predict")
N_DIGITS = 50


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory, mnist) -> str:
    """One small trained run (~97% test accuracy) logged to a temporary store."""
    root = tmp_path_factory.mktemp("predict-store")
    cfg = C.load(ROOT / "experiments/stage3.yaml", {"optim.epochs": 2, "data.train_limit": 10000,
                                                    "data.test_limit": 500, "device": "cpu"})
    with pytest.MonkeyPatch.context() as mp:
        use_fresh_store(root, mp)
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().create_experiment(
            "predict", artifact_location=(root / "artifacts").as_uri()))
        outcome = run_training(cfg, mnist=mnist, run_name="predict-model", progress=False)
        yield f"runs:/{outcome.run_id}/model"
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def model(model_uri):
    return predict_cli.load_model(model_uri)


def as_photo(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark on light, 3-5x larger, somewhere off-centre on a bigger canvas."""
    side = int(round(28 * rng.uniform(3, 5)))
    big = cv2.resize(digit, (side, side), interpolation=cv2.INTER_CUBIC)
    h, w = side + int(rng.integers(40, 120)), side + int(rng.integers(40, 160))
    canvas = np.zeros((h, w), np.uint8)
    top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    canvas[top:top + side, left:left + side] = big
    return 255 - canvas


@pytest.fixture(scope="module")
def photos(tmp_path_factory, mnist) -> list[tuple[int, Path]]:
    """(index into the test set, file) for a PNG and a JPEG of each of the first 50 digits."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    out = []
    for i in range(N_DIGITS):
        image = as_photo(mnist.test_x[i], rng)
        for ext in ("png", "jpg"):
            path = folder / f"digit{i:02d}.{ext}"
            assert cv2.imwrite(str(path), image)
            out.append((i, path))
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


# ---------------------------------------------------------------- preprocessing alone

def test_an_mnist_digit_comes_back_unchanged(mnist):
    # MNIST digits are already size-normalized and centred: preprocessing is ~the identity.
    out = [PP.to_mnist(x) for x in mnist.test_x[:N_DIGITS]]
    assert min(correlation(o, x) for o, x in zip(out, mnist.test_x)) > 0.99


def test_a_photo_is_brought_back_to_the_centred_digit(mnist, photos):
    scores = [correlation(PP.load_digit(path), mnist.test_x[i]) for i, path in photos]
    # A one-pixel difference in centring costs thin strokes a lot, hence the median.
    assert np.median(scores) > 0.9
    assert min(scores) > 0.6


def test_output_follows_the_model_contract(photos):
    x = PP.batch([PP.load_digit(path) for _, path in photos[:4]])
    assert x.shape == (4, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255 and x.max() > 200
    # light digit on dark background, like MNIST: the border is black
    assert np.all(x[:, :, 0, :] == 0) and np.all(x[:, :, :, 0] == 0)


def test_a_blank_image_is_an_error(tmp_path):
    path = tmp_path / "blank.png"
    cv2.imwrite(str(path), np.full((50, 50), 255, np.uint8))
    with pytest.raises(PP.ImageError, match="blank.png: no digit found"):
        PP.load_digit(path)


@pytest.mark.parametrize("name, image", [
    ("gray.png", np.full((60, 40), 128, np.uint8)),
    ("one-pixel.png", np.full((1, 1), 128, np.uint8)),
    ("faint.png", np.pad(np.full((10, 4), 140, np.uint8), 20, constant_values=128)),
    ("noise.png", np.random.default_rng(0).integers(0, 256, (80, 80)).astype(np.uint8)),
    ("gaussian.png", np.clip(np.random.default_rng(1).normal(128, 40, (80, 80)), 0, 255).astype(np.uint8)),
])
def test_an_image_without_a_digit_is_reported_as_such(tmp_path, name, image):
    """These were each given a digit, some with p > 0.9."""
    path = tmp_path / name
    assert cv2.imwrite(str(path), image)
    with pytest.raises(PP.ImageError, match=f"{name}: no digit found"):
        PP.load_digit(path)


def canvas_export(digit: np.ndarray, ink: tuple[int, int, int]) -> np.ndarray:
    """A drawing app's PNG: one ink colour everywhere (BGR), the strokes only in alpha."""
    alpha = cv2.resize(digit, (140, 140), interpolation=cv2.INTER_CUBIC)
    bgra = np.zeros((180, 200, 4), np.uint8)
    bgra[..., :3] = ink
    bgra[20:160, 30:170, 3] = alpha
    return bgra


@pytest.mark.parametrize("ink", [(0, 0, 0), (255, 255, 255), (200, 60, 20)])
def test_strokes_drawn_only_in_alpha_are_the_digit(tmp_path, mnist, ink):
    """Read as grayscale, such a file was one flat colour: 'blank'."""
    scores = []
    for i in range(5):
        path = tmp_path / f"canvas{i}.png"
        assert cv2.imwrite(str(path), canvas_export(mnist.test_x[i], ink))
        scores.append(correlation(PP.load_digit(path), PP.to_mnist(mnist.test_x[i])))
    assert min(scores) > 0.85, scores  # a one-pixel shift in centring costs thin strokes


def test_a_translucent_picture_is_composited_over_white(tmp_path, mnist):
    bgra = np.full((100, 100, 4), 255, np.uint8)
    bgra[..., 3] = 0  # transparent white paper, a dark digit painted opaque on it
    digit = cv2.resize(mnist.test_x[0], (70, 70), interpolation=cv2.INTER_CUBIC)
    bgra[15:85, 15:85, :3] = 255 - digit[..., None]
    bgra[15:85, 15:85, 3] = 255
    path = tmp_path / "sheet.png"
    assert cv2.imwrite(str(path), bgra)
    on_white = np.full((100, 100), 255, np.uint8)  # what a viewer shows
    on_white[15:85, 15:85] = 255 - digit
    np.testing.assert_array_equal(PP.load_digit(path), PP.to_mnist(on_white))


def huge_png(path: Path, side: int) -> Path:
    """A PNG whose header says side x side pixels; its data is a stub (a header check must suffice)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(bytes(side + 1))) + chunk(b"IEND", b""))
    return path


def test_a_huge_image_gets_its_own_error_before_decoding_and_the_rest_are_read(tmp_path, photos):
    huge = huge_png(tmp_path / "huge.png", 40000)
    good = str(photos[0][1])
    images, ok, failed = PR.read_images([str(huge), good])
    assert ok == [good] and len(images) == 1
    (bad,) = failed
    assert bad.file == str(huge) and bad.error.startswith("40000x40000 pixels is over the limit of 50,000,000")


def test_the_pixel_limit_is_configurable(tmp_path, photos, capsys):
    good = str(photos[0][1])
    _, ok, failed = PR.read_images([good], max_pixels=100)
    assert ok == [] and "over the limit of 100 (--max-pixels)" in failed[0].error
    assert predict_cli.main([good, "--max-pixels", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-pixels='0' is not allowed: 1 or more\n"


@pytest.mark.slow  # a process of its own
def test_the_documented_command_runs_the_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mnist_mlflow.predict", str(tmp_path / "x.png"),
                          "--max-pixels", "0"], cwd=ROOT, capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (2, "error: --max-pixels='0' is not allowed: 1 or more\n")


def test_an_unreachable_tracking_server_fails_predict_within_seconds(photos, monkeypatch, capsys):
    import socket
    import time

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    previous = mlflow.get_tracking_uri()  # the module's store, if its fixture has set one
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        assert predict_cli.main([str(photos[0][1]), "--model", "models:/mnist-8k@champion"]) == 2
    finally:
        mlflow.set_tracking_uri(previous)
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "could not load model 'models:/mnist-8k@champion'" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- with the model

def test_photos_get_the_same_class_as_the_originals(mnist, photos, model):
    originals = np.asarray(model.predict(mnist.test_x[:N_DIGITS, None].astype(np.float32)))
    expected = originals.argmax(1)
    assert (expected == mnist.test_y[:N_DIGITS]).mean() >= 0.9  # the model itself is decent
    results = PR.predict_files([str(p) for _, p in photos], model)
    got = np.array([r.digit for r in results])
    agreement = (got == expected[[i for i, _ in photos]]).mean()
    assert agreement >= 0.9, f"only {agreement:.0%} of the photos agree with their originals"
    assert all(0.1 <= r.probability <= 1.0 for r in results)


def test_the_example_digits_are_still_read_as_their_digits(model):
    files = [str(ROOT / "examples/digits" / f) for f in ("three.png", "seven.jpg", "five_dark.png")]
    assert [r.digit for r in PR.predict_files(files, model)] == [3, 7, 5]


def test_more_files_than_the_model_takes_a_call_go_in_several_batches(photos, model, monkeypatch):
    files = [str(p) for _, p in photos[:7]]
    whole = PR.predict_files(files, model)
    monkeypatch.setattr("mnist_mlflow.models.MAX_BATCH", 3)  # the served model's limit, shrunk
    batched = PR.predict_files(files, model)
    # same answers; probabilities to float32's rounding (a batch's size changes its kernels' sums)
    assert [(r.file, r.digit, r.error) for r in batched] == [(r.file, r.digit, r.error) for r in whole]
    assert [r.probability for r in batched] == pytest.approx([r.probability for r in whole], abs=1e-6)


def test_cli_reports_bad_files_and_still_classifies_the_rest(tmp_path, photos, model_uri, capsys):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not a PNG\n")
    missing = tmp_path / "missing.png"
    good = [str(photos[0][1]), str(photos[3][1])]
    files = [good[0], str(empty), str(text), str(missing), good[1]]

    code = predict_cli.main([*files, "--model", model_uri, "--json"])

    assert code == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == files
    errors = {r["file"]: r["error"] for r in rows}
    assert errors[str(empty)] == "file is empty"
    assert errors[str(text)].startswith("not a readable image")
    assert errors[str(missing)] == "no such file"
    for row in (rows[0], rows[4]):
        assert row["error"] is None and 0 <= row["digit"] <= 9 and 0 < row["probability"] <= 1


def test_cli_text_output_and_exit_0_when_all_files_are_fine(photos, model_uri, capsys):
    files = [str(p) for _, p in photos[:2]]
    assert predict_cli.main([*files, "--model", model_uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, f in zip(lines, files):
        assert line.startswith(f"{f}: ") and "(p=" in line


def test_cli_exits_2_for_a_model_that_cannot_be_loaded(photos, model_uri, capsys):
    assert predict_cli.main([str(photos[0][1]), "--model", "models:/no-such-model@champion"]) == 2
    assert "could not load model 'models:/no-such-model@champion'" in capsys.readouterr().err
