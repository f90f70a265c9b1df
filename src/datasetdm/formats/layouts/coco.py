"""COCO 2017, in and out.

The layout as cocodataset.org ships it (``SRC`` holds both folders)::

    annotations/instances_{split}2017.json        images, categories, object annotations
    annotations/person_keypoints_{split}2017.json (optional) the person annotations again, with
                                                  17 keypoints; merged onto the instances by
                                                  annotation id
    annotations/captions_{split}2017.json         (optional) five captions per image
    {split}2017/{file_name}                       the photos

Segmentations may be polygons, compressed RLE or uncompressed RLE. Category ids and names are
kept (COCO's ids run 1-90 with gaps). ``iscrowd`` annotations are not instances: their pixels are
ignore (255) in the semantic mask, and the annotations themselves are kept in the sample's
``meta["coco_crowd"]`` so that exporting back to COCO restores them.

Semantic masks are made from the instances (COCO ships none): crowd regions are painted 255
first, then the instances from largest to smallest (``common.paint_order``), so where instances
overlap the smaller one stays visible, and an instance always wins over a crowd region.

Captions: the first caption of each image (lowest annotation id) is the sample's caption; when an
image has several, all are in ``meta["captions"]``. Image orientation is the stored pixel order
(EXIF rotation is not applied, as COCO's own annotations assume).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import pycocotools.mask as mask_utils

from datasetdm.errors import DatasetdmError
from datasetdm.formats.coco import category_from_coco, category_to_coco, decode_segmentation, encode_rle, instance_to_annotation
from datasetdm.formats.layouts.common import SampleSource, ScannedDataset, SourceItem, load_json, paint_order
from datasetdm.formats.png import encode_image_png, read_rgb
from datasetdm.formats.sample import IGNORE_INDEX, Category, Instance, LabelledSample
from datasetdm.io import atomic_path, write_json_atomic

POLYGON_SLACK = 1.0  # pixels a polygon vertex may lie beyond the image edge (rounding in the tools)


def coco_files(root: Path, split: str) -> dict[str, Path]:
    ann = root / "annotations"
    return {
        "instances": ann / f"instances_{split}2017.json",
        "keypoints": ann / f"person_keypoints_{split}2017.json",
        "captions": ann / f"captions_{split}2017.json",
        "images": root / f"{split}2017",
    }


def _parse_categories(raw, path: Path) -> list[Category]:
    if not isinstance(raw, list):
        raise DatasetdmError(f"{path}: 'categories' must be a list")
    categories = []
    for entry in raw:
        try:
            category = category_from_coco(entry)
        except (TypeError, KeyError, ValueError):
            raise DatasetdmError(f"{path}: bad category {entry!r} (needs an integer 'id' and a 'name')") from None
        if not 1 <= category.id <= 254:
            raise DatasetdmError(f"{path}: category {category.name!r} has id {category.id}; ids must lie in 1..254")
        categories.append(category)
    if len({c.id for c in categories}) != len(categories):
        raise DatasetdmError(f"{path}: duplicate category ids")
    return categories


def scan_coco(src: str | Path, split: str = "train") -> ScannedDataset:
    root = Path(src)
    files = coco_files(root, split)
    if not files["instances"].is_file() and not files["keypoints"].is_file():
        raise DatasetdmError(f"{files['instances']}: missing (COCO instance annotations for --split {split})")
    if not files["images"].is_dir():
        raise DatasetdmError(f"{files['images']}: missing (the {split} images)")
    notes = []
    # the keypoint file alone is enough for a pose set: it holds every person annotation
    ann_path = files["instances"] if files["instances"].is_file() else files["keypoints"]
    if ann_path is files["keypoints"]:
        notes.append(f"{files['instances']}: missing; person instances from {ann_path.name} only")
    data = load_json(ann_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetdmError(f"{ann_path}: not a COCO file (expected an object with an 'images' list)")
    categories = {c.id: c for c in _parse_categories(data.get("categories", []), ann_path)}

    keypoints: dict[int, np.ndarray] = {}
    if files["keypoints"].is_file():
        kp_data = load_json(files["keypoints"]) if ann_path is not files["keypoints"] else data
        for category in _parse_categories(kp_data.get("categories", []), files["keypoints"]):
            categories[category.id] = category  # the same class, now with keypoint names and skeleton
        for ann in kp_data.get("annotations", []):
            values = ann.get("keypoints") if isinstance(ann, dict) else None
            if not values:
                continue
            category = categories.get(ann.get("category_id"))
            expected = 3 * len(category.keypoints) if category and category.keypoints else None
            if expected is None or len(values) != expected:
                raise DatasetdmError(
                    f"{files['keypoints']}: annotation {ann.get('id')}: {len(values)} keypoint values; "
                    f"its category expects {expected or 'none'}"
                )
            keypoints[ann.get("id")] = np.asarray(values, dtype=np.float32).reshape(-1, 3)

    images = {}
    for entry in data["images"]:
        try:
            image_id, file_name = int(entry["id"]), str(entry["file_name"])
            height, width = int(entry["height"]), int(entry["width"])
        except (TypeError, KeyError, ValueError):
            raise DatasetdmError(f"{ann_path}: image entry {entry!r} needs id, file_name, height and width") from None
        if image_id in images:
            raise DatasetdmError(f"{ann_path}: duplicate image id {image_id}")
        images[image_id] = (file_name, height, width)

    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict) or "segmentation" not in ann:
            raise DatasetdmError(f"{ann_path}: annotation {ann!r:.80} needs image_id, category_id and segmentation")
        if ann.get("image_id") not in images:
            raise DatasetdmError(f"{ann_path}: annotation {ann.get('id')}: unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in categories:
            raise DatasetdmError(f"{ann_path}: annotation {ann.get('id')}: unknown category_id {ann.get('category_id')!r}")
        by_image[ann["image_id"]].append(ann)

    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    if files["captions"].is_file():
        for ann in load_json(files["captions"]).get("annotations", []):
            if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and ann.get("image_id") in images:
                captions[ann["image_id"]].append((ann.get("id") or 0, " ".join(ann["caption"].split())))

    items, seen = [], set()
    for image_id, (file_name, height, width) in sorted(images.items(), key=lambda kv: kv[1][0]):
        path = files["images"] / file_name
        if not path.is_file():
            raise DatasetdmError(f"{path}: missing (listed in {ann_path.name})")
        sid = Path(file_name).stem
        if sid in seen:
            raise DatasetdmError(f"{ann_path}: two images are named {sid!r}")
        seen.add(sid)
        anns = sorted(by_image.get(image_id, []), key=lambda a: a.get("id") or 0)
        texts = [text for _, text in sorted(captions.get(image_id, []))]
        items.append(SourceItem(
            sid,
            functools.partial(_load, sid, path, ann_path, image_id, height, width, anns, keypoints, texts),
            functools.partial(lambda anns: frozenset(a["category_id"] for a in anns if not a.get("iscrowd")), anns),
        ))
    return ScannedDataset("coco", root, sorted(categories.values(), key=lambda c: c.id), items, notes)


def _decode(ann: dict, ann_path: Path, file_name: str, height: int, width: int) -> np.ndarray:
    where = f"{ann_path}: annotation {ann.get('id')} (image {file_name})"
    seg = ann["segmentation"]
    if isinstance(seg, list):
        for polygon in seg:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                raise DatasetdmError(f"{where}: a polygon needs an even number of coordinates, at least 6")
            xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
            outside = (xy[:, 0] < -POLYGON_SLACK) | (xy[:, 0] > width + POLYGON_SLACK) | \
                      (xy[:, 1] < -POLYGON_SLACK) | (xy[:, 1] > height + POLYGON_SLACK)
            if outside.any():
                x, y = xy[outside][0]
                raise DatasetdmError(f"{where}: polygon point ({x:g}, {y:g}) lies outside the {width}x{height} image")
    elif isinstance(seg, dict):
        if list(seg.get("size", [])) != [height, width]:
            raise DatasetdmError(f"{where}: RLE size {seg.get('size')} is not the image's (height, width) [{height}, {width}]")
        counts = seg.get("counts")
        if isinstance(counts, list) and sum(counts) != height * width:
            raise DatasetdmError(f"{where}: uncompressed RLE covers {sum(counts)} pixels, the image has {height * width}")
    else:
        raise DatasetdmError(f"{where}: segmentation must be polygons or RLE")
    try:
        return decode_segmentation(seg, height, width)
    except Exception as e:  # pycocotools raises assorted types on corrupt counts
        raise DatasetdmError(f"{where}: segmentation cannot be decoded ({e})") from None


def _load(sid, path, ann_path, image_id, height, width, anns, keypoints, captions) -> LabelledSample:
    image = read_rgb(path)
    if image.shape[:2] != (height, width):
        raise DatasetdmError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]} but {ann_path.name} says {width}x{height}"
        )
    instances, crowd = [], []
    for ann in anns:
        mask = _decode(ann, ann_path, path.name, height, width)
        if ann.get("iscrowd"):
            crowd.append((ann["category_id"], mask))
        else:
            instances.append(Instance(ann["category_id"], mask, keypoints.get(ann.get("id"))))
    semantic = np.zeros((height, width), dtype=np.uint8)
    for _, mask in crowd:
        semantic[mask] = IGNORE_INDEX
    for k in paint_order(instances):
        semantic[instances[k].mask] = instances[k].category_id
    meta = {"coco_id": image_id}
    if crowd:
        meta["coco_crowd"] = [{"category_id": c, "segmentation": encode_rle(m)} for c, m in crowd]
    if len(captions) > 1:
        meta["captions"] = captions
    return LabelledSample(id=sid, image=image, caption=captions[0] if captions else None, semantic=semantic,
                          instances=instances, meta=meta)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_coco(source: SampleSource, stage: Path, split: str, advance: Callable[[], None]) -> list[str]:
    """Write ``source`` in the COCO layout into ``stage``; return notes on what it drops.

    Images are lossless PNGs in ``{split}2017/`` (``file_name`` tells COCO tools the suffix).
    Instances become RLE annotations; a sample with semantic masks but no instances gets one
    annotation per class it shows (COCO-Stuff's convention). Crowd annotations an import kept in
    ``meta["coco_crowd"]`` are written back; other ignore (255) pixels have no class, so COCO
    cannot hold them and they are dropped. person_keypoints and captions files are written when
    the source has keypoints or captions; annotation ids agree across the files.
    """
    image_dir = stage / f"{split}2017"
    image_dir.mkdir(parents=True)
    images, annotations, keypoint_anns, caption_anns = [], [], [], []
    kp_categories = {c.id: len(c.keypoints) for c in source.categories if c.keypoints}
    dropped_ignore = 0
    for sample in source.samples():
        height, width = sample.size
        image_id = len(images) + 1
        file_name = f"{sample.id}.png"
        with atomic_path(image_dir / file_name) as tmp:
            tmp.write_bytes(encode_image_png(sample.image))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        instances = sample.instances
        if instances is None and sample.semantic is not None:
            instances = [Instance(int(c), sample.semantic == c) for c in np.unique(sample.semantic) if c not in (0, IGNORE_INDEX)]
        covered = np.zeros((height, width), dtype=bool)
        for inst in instances or []:
            ann = instance_to_annotation(inst, len(annotations) + 1, image_id)
            covered |= np.asarray(inst.mask, dtype=bool)
            if inst.category_id in kp_categories:
                ann.setdefault("keypoints", [0] * (3 * kp_categories[inst.category_id]))
                ann.setdefault("num_keypoints", 0)
                keypoint_anns.append(ann)
            annotations.append({k: v for k, v in ann.items() if k not in ("keypoints", "num_keypoints")})
        crowd_pixels = np.zeros((height, width), dtype=bool)
        for crowd in sample.meta.get("coco_crowd", []):
            mask = decode_segmentation(crowd["segmentation"], height, width)
            crowd_pixels |= mask
            rle = encode_rle(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": crowd["category_id"],
                                "segmentation": rle, "area": int(mask.sum()),
                                "bbox": [float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})],
                                "iscrowd": 1})
        if sample.semantic is not None:
            dropped_ignore += int(((sample.semantic == IGNORE_INDEX) & ~covered & ~crowd_pixels).sum())
        texts = sample.meta.get("captions") or ([sample.caption] if sample.caption is not None else [])
        for text in texts:
            caption_anns.append({"id": len(caption_anns) + 1, "image_id": image_id, "caption": text})
        advance()
    info = {"description": "exported by datasetdm", "version": "1.0"}
    plain = [{k: v for k, v in category_to_coco(c).items() if k not in ("keypoints", "skeleton")} for c in source.categories]
    ann_dir = stage / "annotations"
    write_json_atomic(ann_dir / f"instances_{split}2017.json",
                      {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": plain})
    notes = []
    if keypoint_anns:
        write_json_atomic(ann_dir / f"person_keypoints_{split}2017.json", {
            "info": info, "licenses": [], "images": images, "annotations": keypoint_anns,
            "categories": [category_to_coco(c) for c in source.categories if c.keypoints],
        })
    if caption_anns:
        write_json_atomic(ann_dir / f"captions_{split}2017.json",
                          {"info": info, "licenses": [], "images": images, "annotations": caption_anns})
    if "depth" in source.tasks:
        notes.append("COCO has no depth: not exported")
    if dropped_ignore:
        notes.append(f"{dropped_ignore} ignore (255) pixels outside any instance have no COCO class: not exported")
    return notes
