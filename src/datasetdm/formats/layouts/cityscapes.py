"""Cityscapes (fine annotations), in and out.

The layout as the leftImg8bit_trainvaltest and gtFine_trainvaltest archives ship it::

    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png     8-bit: the 34 label ids
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_instanceIds.png  16-bit: labelId * 1000 + k
                                                                       for instance k of a class,
                                                                       the plain labelId elsewhere

Label ids map to the 19 training classes (``trainId``) of the Cityscapes benchmark; every other
label (unlabeled, ego vehicle, static, parking, caravan, ...) is ignore (255). Our folder's
category id is ``trainId + 1``, since 0 means background in it (Cityscapes has no background:
every pixel has a label). Instances are the instanceIds values >= 1000 whose label has a train id.
The sample id is the file stem, ``{city}_{seq}_{frame}``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from datasetdm.errors import DatasetdmError
from datasetdm.formats.layouts.common import (
    SampleSource,
    ScannedDataset,
    SourceItem,
    check_label_ids,
    check_size,
    paint_instance_ids,
    read_index_png,
    read_wide_png,
    semantic_from_instances,
)
from datasetdm.formats.png import encode_image_png, read_rgb
from datasetdm.formats.sample import IGNORE_INDEX, Category, Instance, LabelledSample
from datasetdm.io import atomic_path

# (label id, name, train id or None, has instances): the Cityscapes label definitions
CITYSCAPES_LABELS = (
    (0, "unlabeled", None, False), (1, "ego vehicle", None, False),
    (2, "rectification border", None, False), (3, "out of roi", None, False),
    (4, "static", None, False), (5, "dynamic", None, False), (6, "ground", None, False),
    (7, "road", 0, False), (8, "sidewalk", 1, False), (9, "parking", None, False),
    (10, "rail track", None, False), (11, "building", 2, False), (12, "wall", 3, False),
    (13, "fence", 4, False), (14, "guard rail", None, False), (15, "bridge", None, False),
    (16, "tunnel", None, False), (17, "pole", 5, False), (18, "polegroup", None, False),
    (19, "traffic light", 6, False), (20, "traffic sign", 7, False), (21, "vegetation", 8, False),
    (22, "terrain", 9, False), (23, "sky", 10, False), (24, "person", 11, True),
    (25, "rider", 12, True), (26, "car", 13, True), (27, "truck", 14, True), (28, "bus", 15, True),
    (29, "caravan", None, True), (30, "trailer", None, True), (31, "train", 16, True),
    (32, "motorcycle", 17, True), (33, "bicycle", 18, True),
)
CITYSCAPES_CATEGORIES = [
    Category(train_id + 1, name) for _, name, train_id, _ in sorted(
        (label for label in CITYSCAPES_LABELS if label[2] is not None), key=lambda label: label[2])
]
# label id -> our category id (trainId + 1), 255 for labels outside the 19 training classes
LABEL_TO_CATEGORY = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _name, _train_id, _ in CITYSCAPES_LABELS:
    if _train_id is not None:
        LABEL_TO_CATEGORY[_label_id] = _train_id + 1
LABEL_IDS = {label[0] for label in CITYSCAPES_LABELS}
UNLABELED = 0
SPLIT_ALIASES = {"training": "train", "validation": "val"}
IMAGE_SUFFIX, LABEL_SUFFIX, INSTANCE_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png", "_gtFine_instanceIds.png"
_CITYSCAPES_STEM = re.compile(r"^([A-Za-z-]+)_\d+_\d+$")


def _files(folder: Path, suffix: str) -> dict[str, Path]:
    """stem (the part before ``suffix``) -> path, over the city folders of ``folder``."""
    found = {}
    for path in sorted(folder.glob(f"*/*{suffix}")):
        found[path.name[: -len(suffix)]] = path
    return found


def scan_cityscapes(src: str | Path, split: str = "train") -> ScannedDataset:
    root = Path(src)
    split = SPLIT_ALIASES.get(split, split)
    image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise DatasetdmError(f"{folder}: missing (Cityscapes {split} split; --split takes train or val)")
    images = _files(image_root, IMAGE_SUFFIX)
    labels = _files(label_root, LABEL_SUFFIX)
    instances = _files(label_root, INSTANCE_SUFFIX)
    if not images:
        raise DatasetdmError(f"{image_root}: no {{city}}/*{IMAGE_SUFFIX} images")
    for sid, path in labels.items():
        if sid not in images:
            raise DatasetdmError(f"{path}: mask without an image (no {image_root / path.parent.name / (sid + IMAGE_SUFFIX)})")
    items = []
    for sid, image_path in images.items():
        label_path = labels.get(sid)
        if label_path is None:
            raise DatasetdmError(f"{image_path}: no labels ({label_root / image_path.parent.name / (sid + LABEL_SUFFIX)} is missing)")
        instance_path = instances.get(sid)
        if instances and instance_path is None:
            raise DatasetdmError(f"{label_root / image_path.parent.name / (sid + INSTANCE_SUFFIX)}: missing "
                                 "(other images have instanceIds)")
        items.append(SourceItem(sid, functools.partial(_load, sid, image_path, label_path, instance_path),
                                functools.partial(_class_ids, label_path)))
    notes = [] if instances else [f"{label_root}: no *{INSTANCE_SUFFIX}; semantic masks only"]
    return ScannedDataset("cityscapes", root, list(CITYSCAPES_CATEGORIES), items, notes)


def _semantic(label_path: Path) -> np.ndarray:
    label_ids = read_index_png(label_path, "a Cityscapes labelIds mask")
    check_label_ids(label_path, label_ids, LABEL_IDS, "Cityscapes label ids are 0-33")
    return LABEL_TO_CATEGORY[label_ids]


def _class_ids(label_path: Path) -> frozenset[int]:
    return frozenset(int(v) for v in np.unique(_semantic(label_path)) if v != IGNORE_INDEX)


def _load(sid: str, image_path: Path, label_path: Path, instance_path: Path | None) -> LabelledSample:
    image = read_rgb(image_path)
    semantic = _semantic(label_path)
    check_size(label_path, semantic, image_path, image)
    instances = None
    if instance_path is not None:
        ids = read_wide_png(instance_path, "a Cityscapes instanceIds mask")
        check_size(instance_path, ids, image_path, image)
        instances = []
        for value in np.unique(ids):
            if value < 1000:
                continue  # a plain label id: stuff, or a crowd of a thing class
            label_id = int(value) // 1000
            if label_id not in LABEL_IDS:
                raise DatasetdmError(f"{instance_path}: value {int(value)} has unknown label id {label_id}")
            category_id = int(LABEL_TO_CATEGORY[label_id])
            if category_id != IGNORE_INDEX:  # caravan and trailer instances: not a training class
                instances.append(Instance(category_id, ids == value))
    return LabelledSample(id=sid, image=image, semantic=semantic, instances=instances)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_cityscapes(source: SampleSource, stage: Path, split: str, advance: Callable[[], None]) -> list[str]:
    """Write ``source`` in the Cityscapes layout into ``stage``; return notes on what it drops.

    Categories are matched to Cityscapes labels by name (an unknown name is an error: the layout
    has fixed label ids). Background (0) and ignore (255) both become ``unlabeled`` (0), since
    Cityscapes has no background class. instanceIds hold ``labelId * 1000 + k`` for the k-th
    instance of a class (in list order, painted larger first so smaller ones stay visible) and
    the plain label id elsewhere. A sample id of Cityscapes form (``{city}_{seq}_{frame}``) keeps
    its city folder; other ids go under ``datasetdm/``.
    """
    by_name = {name: label_id for label_id, name, _, _ in CITYSCAPES_LABELS}
    unknown = [c.name for c in source.categories if c.name not in by_name]
    if unknown:
        raise DatasetdmError(f"{source.path}: classes {unknown} have no Cityscapes label; "
                             f"Cityscapes export needs Cityscapes class names ({', '.join(c.name for c in CITYSCAPES_CATEGORIES)})")
    to_label = np.zeros(256, dtype=np.int64)  # 0 background and 255 ignore -> unlabeled
    for c in source.categories:
        to_label[c.id] = by_name[c.name]
    notes = set()
    for sample in source.samples():
        height, width = sample.size
        if sample.semantic is None and sample.instances is None:
            raise DatasetdmError(f"{source.path}: sample {sample.id!r} has no semantic masks or instances; Cityscapes needs one")
        semantic = sample.semantic if sample.semantic is not None else semantic_from_instances(sample.instances, (height, width))
        label_ids = to_label[semantic]
        match = _CITYSCAPES_STEM.match(sample.id)
        city = match.group(1) if match else "datasetdm"
        write = functools.partial(_write_png, stage, split, city, sample.id)
        write("leftImg8bit", IMAGE_SUFFIX, encode_image_png(sample.image))
        write("gtFine", LABEL_SUFFIX, _png(Image.fromarray(label_ids.astype(np.uint8))))
        if sample.instances is not None:
            index = paint_instance_ids(sample.instances, (height, width))
            encoded = label_ids.copy()
            per_class: dict[int, int] = {}
            for k, inst in enumerate(sample.instances):
                label_id = int(to_label[inst.category_id])
                encoded[index == k + 1] = label_id * 1000 + per_class.get(label_id, 0)
                per_class[label_id] = per_class.get(label_id, 0) + 1
            write("gtFine", INSTANCE_SUFFIX, _png(Image.fromarray(encoded.astype(np.uint16))))
        if sample.depth is not None:
            notes.add("depth")
        if any(inst.keypoints is not None for inst in sample.instances or []):
            notes.add("keypoints")
        if sample.caption is not None:
            notes.add("captions")
        advance()
    return [f"Cityscapes has no {kind}: not exported" for kind in sorted(notes)]


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png(stage: Path, split: str, city: str, sid: str, top: str, suffix: str, data: bytes) -> None:
    with atomic_path(stage / top / split / city / f"{sid}{suffix}") as tmp:
        tmp.write_bytes(data)
