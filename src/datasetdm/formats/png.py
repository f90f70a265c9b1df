"""PNG helpers for label maps: palettized semantic masks and uint16 depth in millimetres.

Both are written atomically and read back without any colour conversion: the value stored in a
pixel is the label (class id, or depth in mm), never a colour.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from datasetdm.errors import DatasetdmError
from datasetdm.io import atomic_path

DEPTH_SCALE = 0.001
"""Metres per unit of a depth PNG (NYU convention: uint16 millimetres, 0 = no depth)."""

MAX_DEPTH_M = 65535 * DEPTH_SCALE
"""Largest depth a uint16 mm PNG can hold (65.535 m); farther values are clipped to it."""

SEMANTIC_MODES = ("P", "L")
DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")


def voc_palette() -> list[int]:
    """The 256-colour PASCAL VOC palette (flat RGB list), so masks look familiar in any viewer.

    Index 0 is black (background) and 255 is (224, 224, 192), VOC's colour for 'ignore'.
    """
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


_VOC_PALETTE = voc_palette()


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_semantic_png(mask: np.ndarray) -> bytes:
    """An (H, W) uint8 class-id map as a palettized 'P' PNG; pixel values are the ids."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    h, w = mask.shape
    image = Image.frombytes("P", (w, h), mask.tobytes())
    # Without an explicit 256-entry palette Pillow may save a 1-bit PNG and cut the ids.
    image.putpalette(_VOC_PALETTE)
    return _png_bytes(image)


def encode_depth_png(depth_m: np.ndarray, name: str = "depth") -> bytes:
    """An (H, W) depth map in metres as a uint16 PNG in millimetres.

    0 stays 0 (no depth). Positive depths never round down to 0 (they become 1 mm), and depths
    beyond 65.535 m are clipped to 65535: uint16 millimetres cannot hold more. ``name`` (a path)
    goes into the error message.
    """
    depth_m = np.asarray(depth_m, dtype=np.float64)
    if not np.isfinite(depth_m).all():
        raise DatasetdmError(f"{name}: depth contains NaN or infinite values")
    if (depth_m < 0).any():
        raise DatasetdmError(f"{name}: depth contains negative values")
    mm = np.clip(np.rint(depth_m / DEPTH_SCALE), 0, 65535)
    mm[(depth_m > 0) & (mm == 0)] = 1
    return _png_bytes(Image.fromarray(np.ascontiguousarray(mm.astype(np.uint16))))


def encode_image_png(image: np.ndarray) -> bytes:
    return _png_bytes(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)))


def _write(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_semantic_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    _write(path, encode_semantic_png(mask))


def write_depth_png(path: str | os.PathLike, depth_m: np.ndarray) -> None:
    _write(path, encode_depth_png(depth_m, str(path)))


def write_image_png(path: str | os.PathLike, image: np.ndarray) -> None:
    _write(path, encode_image_png(image))


def open_header(path: Path) -> Image.Image:
    """Open an image reading only its header (cheap); raise DatasetdmError if it is not an image."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DatasetdmError(f"{path}: file is missing") from None
    except Exception as e:  # Pillow raises several types for garbage bytes
        raise DatasetdmError(f"{path}: not a readable image ({e})") from None


def load_pixels(path: Path) -> Image.Image:
    """Open and fully decode an image; truncated or corrupt data is a DatasetdmError."""
    image = open_header(path)
    try:
        image.load()
    except Exception as e:
        raise DatasetdmError(f"{path}: corrupt or truncated image ({e})") from None
    return image


def read_rgb(path: Path) -> np.ndarray:
    image = load_pixels(path)
    # Grayscale or RGBA user images are accepted; the sample contract is RGB.
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_semantic_png(path: Path) -> np.ndarray:
    """(H, W) uint8 class ids from a 'P' (palette indices) or 'L' PNG."""
    image = load_pixels(path)
    if image.mode not in SEMANTIC_MODES:
        raise DatasetdmError(
            f"{path}: semantic mask must be a single-channel 'P' or 'L' PNG, got mode {image.mode!r}"
        )
    # np.asarray of a 'P' image gives palette indices, which are the ids: no colour lookup.
    return np.asarray(image, dtype=np.uint8)


def read_depth_png(path: Path, scale: float = DEPTH_SCALE) -> np.ndarray:
    """(H, W) float32 depth in metres from a 16-bit PNG; 0 stays 0 (no depth)."""
    image = load_pixels(path)
    if image.mode not in DEPTH_MODES:
        raise DatasetdmError(f"{path}: depth must be a 16-bit grayscale PNG, got mode {image.mode!r}")
    raw = np.asarray(image)
    if raw.dtype != np.uint16 and (raw.min(initial=0) < 0 or raw.max(initial=0) > 65535):
        raise DatasetdmError(f"{path}: depth values outside the uint16 range")
    return (raw.astype(np.float64) * scale).astype(np.float32)
