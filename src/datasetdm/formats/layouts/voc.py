"""PASCAL VOC 2012 segmentation, in and out.

The layout as the VOCtrainval_11-May-2012 archive ships it (``SRC`` is the ``VOC2012`` folder;
its parent ``VOCdevkit`` is accepted too)::

    JPEGImages/{id}.jpg                 the photo
    SegmentationClass/{id}.png          palette PNG: index 0 background, 1-20 the classes in
                                        VOC order (aeroplane ... tvmonitor), 255 the border
    SegmentationObject/{id}.png         palette PNG: index k >= 1 is object k, 0 background, 255
                                        the border; an object's class is the class under it
    ImageSets/Segmentation/{split}.txt  one id a line (train, val, trainval)

The palette index *is* the label: masks are read without any colour conversion, class ids are kept
(not made binary, as the DatasetDM reference loader did, its issue #38), and the 255 border stays
255 (ignore). Export writes the same layout; a ``categories.json`` (``[{"id", "name"}]``) names
the classes when they are not the 20 VOC ones, and the importer reads it back.
"""

from __future__ import annotations

import functools
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
    read_categories_json,
    read_index_png,
    semantic_from_instances,
)
from datasetdm.formats.png import encode_semantic_png, read_rgb
from datasetdm.formats.sample import IGNORE_INDEX, Category, Instance, LabelledSample
from datasetdm.io import atomic_path, write_json_atomic

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_CATEGORIES = [Category(i + 1, name) for i, name in enumerate(VOC_CLASSES)]
CATEGORIES_FILE = "categories.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # VOC ships .jpg; a PNG copy of the folder also reads
JPEG_QUALITY = 95


def voc_root(src: Path) -> Path:
    if not src.is_dir():
        raise DatasetdmError(f"{src}: not a folder (expected the VOC2012 folder)")
    if not (src / "ImageSets").is_dir() and (src / "VOC2012" / "ImageSets").is_dir():
        return src / "VOC2012"  # the VOCdevkit folder around it
    return src


def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetdmError(f"{path}: missing (the list of image ids for this split)")
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DatasetdmError(f"{path}: lists no images")
    if len(set(ids)) != len(ids):
        raise DatasetdmError(f"{path}: lists an image id twice")
    return ids


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def scan_voc(src: str | Path, split: str = "train") -> ScannedDataset:
    root = voc_root(Path(src))
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = read_id_list(list_file)
    categories = read_categories_json(root / CATEGORIES_FILE) if (root / CATEGORIES_FILE).exists() else VOC_CATEGORIES
    class_dir, object_dir, image_dir = root / "SegmentationClass", root / "SegmentationObject", root / "JPEGImages"
    with_objects = object_dir.is_dir()
    allowed = {0, IGNORE_INDEX} | {c.id for c in categories}
    items = []
    for sid in ids:
        class_png = class_dir / f"{sid}.png"
        if not class_png.is_file():
            raise DatasetdmError(f"{class_png}: missing (listed in {list_file})")
        image_path = _find_image(image_dir, sid)
        if image_path is None:
            raise DatasetdmError(f"{class_png}: mask without an image (no {image_dir / (sid + '.jpg')})")
        object_png = object_dir / f"{sid}.png" if with_objects else None
        if object_png is not None and not object_png.is_file():
            raise DatasetdmError(f"{object_png}: missing (listed in {list_file}; other images have object masks)")
        items.append(SourceItem(
            sid,
            functools.partial(_load, sid, image_path, class_png, object_png, allowed),
            functools.partial(_class_ids, class_png, allowed),
        ))
    notes = [] if with_objects else [f"{object_dir}: missing; semantic masks only"]
    return ScannedDataset("voc", root, list(categories), items, notes)


def _read_classes(class_png: Path, allowed: set[int]) -> np.ndarray:
    semantic = read_index_png(class_png, "a VOC class mask")
    check_label_ids(class_png, semantic, allowed, "VOC class masks hold 0 background, the class ids, 255 border")
    return semantic


def _class_ids(class_png: Path, allowed: set[int]) -> frozenset[int]:
    values = np.unique(_read_classes(class_png, allowed))
    return frozenset(int(v) for v in values if v not in (0, IGNORE_INDEX))


def _load(sid: str, image_path: Path, class_png: Path, object_png: Path | None, allowed: set[int]) -> LabelledSample:
    image = read_rgb(image_path)
    semantic = _read_classes(class_png, allowed)
    check_size(class_png, semantic, image_path, image)
    instances = None
    if object_png is not None:
        objects = read_index_png(object_png, "a VOC object mask")
        check_size(object_png, objects, image_path, image)
        instances = []
        for index in np.unique(objects):
            if index in (0, IGNORE_INDEX):
                continue
            mask = objects == index
            under = semantic[mask]
            under = under[(under != 0) & (under != IGNORE_INDEX)]
            if under.size == 0:
                raise DatasetdmError(
                    f"{object_png}: object {int(index)} covers no class pixels in {class_png.name}, so it has no class"
                )
            # the class mask and the object mask agree in VOC; the majority guards against a stray pixel
            instances.append(Instance(int(np.bincount(under).argmax()), mask))
    return LabelledSample(id=sid, image=image, semantic=semantic, instances=instances)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_voc(source: SampleSource, stage: Path, split: str, advance: Callable[[], None]) -> list[str]:
    """Write ``source`` in the VOC layout into ``stage``; return notes on what the layout drops.

    Images are written as JPEG (quality 95, no chroma subsampling) because VOC loaders look for
    ``JPEGImages/{id}.jpg``; labels are lossless PNGs. Samples without semantic masks get them
    from their instances (``common.paint_order``: smaller instances on top). SegmentationObject
    numbers the instances 1..N in list order, painted with the same rule, and carries the 255
    border wherever the semantic mask is 255 and no instance lies.
    """
    if any(c.id > 254 for c in source.categories):
        raise DatasetdmError(f"{source.path}: category ids above 254 do not fit a VOC palette PNG")
    ids, dropped = [], set()
    with_objects = "instances" in source.tasks
    for sample in source.samples():
        height, width = sample.size
        if sample.semantic is None and sample.instances is None:
            raise DatasetdmError(f"{source.path}: sample {sample.id!r} has no semantic masks or instances; VOC needs one")
        semantic = sample.semantic if sample.semantic is not None else semantic_from_instances(sample.instances, (height, width))
        with atomic_path(stage / "JPEGImages" / f"{sample.id}.jpg") as tmp:
            Image.fromarray(sample.image).save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        with atomic_path(stage / "SegmentationClass" / f"{sample.id}.png") as tmp:
            tmp.write_bytes(encode_semantic_png(semantic))
        if with_objects:
            instances = sample.instances or []
            if len(instances) > 254:
                raise DatasetdmError(f"{source.path}: sample {sample.id!r} has {len(instances)} instances; VOC object masks hold 254")
            objects = paint_instance_ids(instances, (height, width))
            objects[(objects == 0) & (semantic == IGNORE_INDEX)] = IGNORE_INDEX
            with atomic_path(stage / "SegmentationObject" / f"{sample.id}.png") as tmp:
                tmp.write_bytes(encode_semantic_png(objects.astype(np.uint8)))
        if sample.depth is not None:
            dropped.add("depth")
        if any(inst.keypoints is not None for inst in sample.instances or []):
            dropped.add("keypoints")
        if sample.caption is not None:
            dropped.add("captions")
        ids.append(sample.id)
        advance()
    lists = stage / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    with atomic_path(lists / f"{split}.txt") as tmp:
        tmp.write_text("".join(f"{sid}\n" for sid in ids))
    if [(c.id, c.name) for c in source.categories] != [(c.id, c.name) for c in VOC_CATEGORIES]:
        write_json_atomic(stage / CATEGORIES_FILE, [{"id": c.id, "name": c.name} for c in source.categories])
    return [f"VOC has no {kind}: not exported" for kind in sorted(dropped)]
