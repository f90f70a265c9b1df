"""COCO JSON pieces: RLE masks, keypoints and categories, to and from the in-memory types."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils

from datasetdm.formats.sample import Category, Instance


def encode_rle(mask: np.ndarray) -> dict:
    """Binary (H, W) mask -> COCO compressed RLE with ``counts`` as str (JSON-serializable)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_bbox(rle: dict) -> list[float]:
    """[x, y, w, h] of an RLE from ``encode_rle``; an empty mask gives [0, 0, 0, 0], which COCO tools accept."""
    return [float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})]


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` (compressed RLE, uncompressed RLE or polygons) -> (H, W) bool mask."""
    if isinstance(segmentation, list) and not segmentation:
        return np.zeros((height, width), dtype=bool)
    if isinstance(segmentation, list):  # polygons, as in most user COCO files
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        counts = counts.encode("ascii") if isinstance(counts, str) else counts
        rle = {"size": segmentation["size"], "counts": counts}
    return mask_utils.decode(rle).astype(bool)


def instance_to_annotation(instance: Instance, ann_id: int, image_id: int) -> dict:
    mask = np.asarray(instance.mask, dtype=bool)
    rle = encode_rle(mask)
    bbox = rle_bbox(rle)
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(instance.category_id),
        "segmentation": rle,
        "area": int(mask.sum()),
        "bbox": bbox,
        "iscrowd": 0,
    }
    if instance.keypoints is not None:
        kp = np.asarray(instance.keypoints, dtype=np.float64).reshape(-1, 3).copy()
        # COCO convention: an unlabelled keypoint (v=0) is stored as 0, 0, 0.
        kp[kp[:, 2] == 0] = 0
        ann["keypoints"] = [float(v) if i % 3 != 2 else int(v) for i, v in enumerate(kp.reshape(-1))]
        ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
    if instance.score is not None:
        ann["score"] = float(instance.score)
    return ann


def annotation_to_instance(ann: dict, height: int, width: int) -> Instance:
    keypoints = None
    if "keypoints" in ann and ann["keypoints"]:
        keypoints = np.asarray(ann["keypoints"], dtype=np.float32).reshape(-1, 3)
    return Instance(
        category_id=int(ann["category_id"]),
        mask=decode_segmentation(ann["segmentation"], height, width),
        keypoints=keypoints,
        score=float(ann["score"]) if ann.get("score") is not None else None,
    )


def category_to_coco(category: Category) -> dict:
    entry = {"id": int(category.id), "name": category.name, "supercategory": category.name}
    if category.keypoints is not None:
        entry["keypoints"] = list(category.keypoints)
        entry["skeleton"] = [list(edge) for edge in (category.skeleton or ())]
    return entry


def category_from_coco(entry: dict) -> Category:
    keypoints = entry.get("keypoints")
    skeleton = entry.get("skeleton")
    return Category(
        id=int(entry["id"]),
        name=str(entry["name"]),
        keypoints=tuple(keypoints) if keypoints else None,
        skeleton=tuple(tuple(int(i) for i in edge) for edge in skeleton) if keypoints and skeleton else None,
    )
