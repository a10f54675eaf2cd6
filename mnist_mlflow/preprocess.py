"""Photos and scans of one digit -> MNIST-style 28x28 images, the way MNIST itself was made.

MNIST digits are light strokes on a black background, size-normalized to fit a 20x20
box (aspect ratio kept, anti-aliased), then placed in 28x28 so that their centre of
mass sits at the centre. The model's contract is float32 raw pixels 0-255, shape
(N, 1, 28, 28); normalization happens inside the model. No MLflow in here.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

BOX = 20  # the digit's longest side after size normalization
SIZE = 28
MIN_COMPONENT_SHARE = 0.05  # ink blobs smaller than this share of the largest are noise
# What counts as a digit: strokes and background two-toned. MIN_CONTRAST: gray levels between
# the image's darkest and lightest pixel. MIN_SEPARABILITY: Otsu's between-class variance over
# the total variance (1 for two tones): digits, scanned or drawn, score above 0.8; noise, which
# Otsu still splits in two, below 0.75.
MIN_CONTRAST = 24
MIN_SEPARABILITY = 0.78
# Decoding holds every pixel in memory, several times over, however small the file (a
# compressed PNG of a few hundred KB can decode to gigabytes); 50 MP admits any phone photo.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """A file is missing, empty, not an image, or holds no digit."""


def header(path: Path) -> tuple[tuple[int, int], bool] | None:
    """((width, height), has alpha) from the file's header, without decoding; None if Pillow
    cannot tell."""
    from PIL import Image, UnidentifiedImageError

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we judge the size ourselves
    try:
        with Image.open(path) as im:  # lazy: reads the header only
            return im.size, im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None  # OpenCV may still read it (and refuses over 2^30 pixels itself)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_gray(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 grayscale, or ImageError saying why not."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    size, alpha = header(path) or (None, False)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(f"{path}: {size[0]}x{size[1]} pixels is over the limit of {max_pixels:,} "
                         "(--max-pixels); scale it down first")
    # Checked above because imread says None for all three cases, and warns for a missing one.
    try:  # grayscale decoding drops alpha, where a canvas export keeps its strokes
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED if alpha else cv2.IMREAD_GRAYSCALE)
    except cv2.error as exc:  # e.g. OpenCV's own size limit, for a format Pillow does not know
        raise ImageError(f"{path}: OpenCV cannot decode it ({str(exc).strip().splitlines()[-1]})") from None
    if image is None or image.size == 0:
        raise ImageError(f"{path}: not a readable image (PNG, JPEG, BMP, TIFF, ...)")
    return flatten_alpha(image) if image.ndim == 3 else image


def flatten_alpha(image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR or BGRA (8 or 16 bits) -> uint8 gray.

    Where every visible pixel has the same colour (a canvas export: one ink, transparent
    paper), the strokes are only in alpha, so alpha is the image (light ink on dark).
    Otherwise the picture is composited over white, as a viewer shows it.
    """
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ImageError(f"expected 8-bit pixels, got {image.dtype}")
    gray = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_BGR2GRAY)
    if image.shape[2] < 4:
        return gray
    alpha = image[..., 3]
    visible = gray[alpha > 0]
    if visible.size and visible.min() == visible.max():
        return alpha.copy()
    a = alpha.astype(np.float32) / 255.0
    return np.round(gray * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def light_on_dark(gray: np.ndarray) -> np.ndarray:
    """Inverts dark-on-light images: the background (the border) must be the dark side."""
    threshold, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return 255 - gray if np.median(_border(gray)) > threshold else gray


def check_digit_like(image: np.ndarray) -> None:
    """ImageError unless the image could hold a digit: enough contrast, and two-toned."""
    low, high = int(image.min()), int(image.max())
    if high - low < MIN_CONTRAST:
        raise ImageError(f"no digit found: the image is nearly uniform (gray levels {low}-{high}, "
                         f"a digit needs {MIN_CONTRAST} apart)")
    blurred = cv2.GaussianBlur(image, (3, 3), 0)
    threshold, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    values = blurred.astype(np.float64)
    ink = values > threshold
    share = ink.mean()
    separability = (share * (1 - share) * (values[ink].mean() - values[~ink].mean()) ** 2
                    / values.var()) if 0 < share < 1 else 0.0
    if separability < MIN_SEPARABILITY:
        raise ImageError(f"no digit found: no strokes stand out from the background (separability "
                         f"{separability:.2f}, a digit needs {MIN_SEPARABILITY}; noise?)")


def ink_mask(image: np.ndarray) -> np.ndarray:
    """Otsu mask of the strokes after a light blur; specks far smaller than the digit dropped."""
    blurred = cv2.GaussianBlur(image, (3, 3), 0)
    _, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= MIN_COMPONENT_SHARE * areas.max()) + 1
    return np.where(np.isin(labels, keep), 255, 0).astype(np.uint8)


def stretch(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Background to 0 and strokes to full scale, as in MNIST; anti-aliased edges survive."""
    background = float(np.median(image[mask == 0])) if (mask == 0).any() else 0.0
    ink = float(np.percentile(image[mask > 0], 95))
    if ink <= background:
        raise ImageError("no contrast between digit and background")
    scaled = (image.astype(np.float32) - background) * (255.0 / (ink - background))
    return np.clip(scaled, 0, 255)


def fit_box(digit: np.ndarray, box: int = BOX) -> np.ndarray:
    """Resizes so the longest side is `box`, keeping the aspect ratio (INTER_AREA)."""
    h, w = digit.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(digit, size, interpolation=cv2.INTER_AREA)


def center_of_mass_shift(canvas: np.ndarray) -> np.ndarray:
    """Moves the intensity centre of mass to pixel (14, 14) by a whole-pixel shift.

    MNIST's own test digits have their centre of mass at 14.0 +- 0.29 (row and column
    index): whole-pixel shifts to 14, not 13.5, and no sub-pixel blur of the strokes.
    """
    m = cv2.moments(canvas)
    if m["m00"] == 0:
        return canvas
    dx = round(SIZE / 2 - m["m10"] / m["m00"])
    dy = round(SIZE / 2 - m["m01"] / m["m00"])
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(canvas, shift, (SIZE, SIZE), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """One grayscale digit image (any size, any polarity) -> float32 (28, 28), 0-255."""
    if gray.ndim == 3:  # an array from elsewhere: OpenCV's BGR or BGRA order
        gray = flatten_alpha(gray)
    if gray.dtype != np.uint8:
        raise ImageError(f"expected 8-bit pixels, got {gray.dtype}")
    image = light_on_dark(gray)
    check_digit_like(image)
    mask = ink_mask(image)
    if not mask.any():
        raise ImageError("no digit found: the image is blank")
    # The 3x3 dilation keeps the anti-aliased rim that Otsu cuts off, as MNIST's boxes do.
    clean = np.where(cv2.dilate(mask, np.ones((3, 3), np.uint8)) > 0, stretch(image, mask), 0)
    x, y, w, h = cv2.boundingRect((clean > 0).astype(np.uint8))
    digit = fit_box(clean[y:y + h, x:x + w].astype(np.float32))
    canvas = np.zeros((SIZE, SIZE), np.float32)
    top, left = (SIZE - digit.shape[0]) // 2, (SIZE - digit.shape[1]) // 2
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return np.clip(center_of_mass_shift(canvas), 0, 255).astype(np.float32)


def load_digit(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A file -> float32 (28, 28); ImageError names the file."""
    try:
        return to_mnist(read_gray(path, max_pixels))
    except ImageError as exc:
        message = str(exc)
        raise ImageError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def batch(images: list[np.ndarray]) -> np.ndarray:
    """(28, 28) images -> the model's input, float32 (N, 1, 28, 28)."""
    return np.stack(images).astype(np.float32)[:, None]
