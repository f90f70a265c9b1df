"""NYU Depth v2 as image + depth files (depth only: no classes).

Two layouts are read, searched under ``SRC``:

(a) The BTS / "sync" layout most depth code uses: ``rgb_{n}.jpg`` next to ``sync_depth_{n}.png``
    in the same folder (e.g. ``sync/kitchen_0028b/rgb_00045.jpg``; the official test split as
    ``official_splits/test/{scene}/``), searched recursively. The sample id is the folder path
    and number, ``kitchen_0028b_00045``.
(b) ``SRC/images/{stem}.{jpg,png}`` with ``SRC/depth/{stem}.{png,npy}``; the id is the stem.

Depth PNGs are 16-bit; a unit is ``depth_scale`` metres (``--depth-scale``, default 0.001: the
millimetres of NYU's and BTS's PNGs). ``.npy`` files hold metres as floats. 0 means no depth (a
missing Kinect reading) and stays 0. ``--split`` does not apply: point ``SRC`` at the split's
folder. The raw .mat release is not read (convert it to (b) first).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.layouts.common import ScannedDataset, SourceItem, check_size
from datasetdm.formats.png import read_depth_png, read_rgb
from datasetdm.formats.sample import LabelledSample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def scan_nyu(src: str | Path, depth_scale: float = 0.001) -> ScannedDataset:
    root = Path(src)
    if not root.is_dir():
        raise DatasetdmError(f"{root}: not a folder")
    if not depth_scale > 0:
        raise DatasetdmError(f"--depth-scale {depth_scale}: must be a positive number of metres per unit")
    if (root / "images").is_dir() and (root / "depth").is_dir():
        pairs = _folder_pairs(root)
    else:
        pairs = _sync_pairs(root)
    if not pairs:
        raise DatasetdmError(f"{root}: no NYU depth files (expected rgb_*.jpg + sync_depth_*.png pairs, "
                             "or images/ + depth/ folders with matching names)")
    items = [SourceItem(sid, functools.partial(_load, sid, image, depth, depth_scale)) for sid, image, depth in pairs]
    return ScannedDataset("nyu", root, [], items, [])


def _sync_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    pairs, seen = [], {}
    for depth in sorted(root.rglob("sync_depth_*.png")):
        number = depth.stem[len("sync_depth_"):]
        image = next((depth.with_name(f"rgb_{number}{s}") for s in IMAGE_SUFFIXES
                      if depth.with_name(f"rgb_{number}{s}").is_file()), None)
        if image is None:
            raise DatasetdmError(f"{depth}: depth without an image (no {depth.with_name(f'rgb_{number}.jpg')})")
    for image in sorted(p for p in root.rglob("rgb_*") if p.suffix.lower() in IMAGE_SUFFIXES):
        number = image.stem[len("rgb_"):]
        depth = image.with_name(f"sync_depth_{number}.png")
        if not depth.is_file():
            raise DatasetdmError(f"{image}: no depth ({depth.name} is missing)")
        folder = image.parent.relative_to(root).parts
        sid = "_".join(folder + (number,))
        if sid in seen:
            raise DatasetdmError(f"{image}: same sample id {sid!r} as {seen[sid]}")
        seen[sid] = image
        pairs.append((sid, image, depth))
    return pairs


def _folder_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    images = {p.stem: p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    depths = {p.stem: p for p in sorted((root / "depth").iterdir()) if p.suffix.lower() in (".png", ".npy")}
    for stem, path in depths.items():
        if stem not in images:
            raise DatasetdmError(f"{path}: depth without an image (no {root / 'images' / stem}.jpg or .png)")
    pairs = []
    for stem, image in images.items():
        if stem not in depths:
            raise DatasetdmError(f"{image}: no depth ({root / 'depth' / stem}.png or .npy is missing)")
        pairs.append((stem, image, depths[stem]))
    return pairs


def _read_npy(path: Path) -> np.ndarray:
    try:
        depth = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / EOFError for bad files
        raise DatasetdmError(f"{path}: not a readable .npy array ({e})") from None
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        raise DatasetdmError(f"{path}: depth must be a 2-D numeric array in metres, got {depth.shape} {depth.dtype}")
    if not np.isfinite(depth).all():
        raise DatasetdmError(f"{path}: depth has NaN or infinite values (use 0 for no depth)")
    if (depth < 0).any():
        raise DatasetdmError(f"{path}: depth has negative values")
    return depth.astype(np.float32)


def _load(sid: str, image_path: Path, depth_path: Path, depth_scale: float) -> LabelledSample:
    image = read_rgb(image_path)
    depth = _read_npy(depth_path) if depth_path.suffix.lower() == ".npy" else read_depth_png(depth_path, depth_scale)
    check_size(depth_path, depth, image_path, image)
    return LabelledSample(id=sid, image=image, depth=depth)
