"""Metrics for every task, on LabelledSample-style arrays, from the standard implementations.

- semantic: mIoU from torchmetrics ``MulticlassJaccardIndex(ignore_index=255)``, accumulated over
  the whole set (one confusion matrix, the VOC convention); classes absent from both prediction
  and ground truth do not count;
- instances: mask AP and AP50 from pycocotools ``COCOeval(iouType="segm")``;
- depth: AbsRel, RMSE and δ1 (max(ŷ/y, y/ŷ) < 1.25) over pixels with depth > 0, computed per image
  and averaged over images (the NYU convention);
- pose: keypoint AP from pycocotools ``COCOeval(iouType="keypoints")`` with COCO's 17 sigmas.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from datasetdm.formats.coco import encode_rle, rle_bbox
from datasetdm.formats.sample import IGNORE_INDEX, Instance


class SemanticIoU:
    def __init__(self, category_ids: list[int]):
        from torchmetrics.classification import MulticlassJaccardIndex

        self.values = [0] + [int(c) for c in category_ids]
        lut = np.full(256, -1, np.int64)
        lut[self.values] = np.arange(len(self.values))
        lut[IGNORE_INDEX] = IGNORE_INDEX
        self.lut = lut
        kw = dict(num_classes=len(self.values), ignore_index=IGNORE_INDEX)
        self.macro = MulticlassJaccardIndex(**kw)
        self.per_class = MulticlassJaccardIndex(average=None, **kw)
        self.seen = np.zeros(len(self.values), bool)

    def _index(self, a: np.ndarray, what: str) -> torch.Tensor:
        idx = self.lut[np.asarray(a, np.uint8).astype(np.int64)]
        if (idx < 0).any():
            bad = sorted(set(np.asarray(a)[idx < 0].tolist()))
            raise ValueError(f"{what} contains unknown class values {bad}")
        return torch.as_tensor(idx)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in size")
        p, t = self._index(pred, "prediction")[None], self._index(target, "ground truth")[None]
        self.macro.update(p, t)
        self.per_class.update(p, t)
        valid = t != IGNORE_INDEX
        for x in (p[valid], t[valid]):
            self.seen[np.unique(x.numpy())] = True

    def compute(self) -> dict:
        """mIoU and per-class IoU; mIoU is NaN (reported as null) when no pixel could be scored,
        not the 0 of an empty confusion matrix."""
        if not self.seen.any():
            return {"miou": float("nan"), "iou": {}}
        per = self.per_class.compute().numpy()
        return {"miou": float(self.macro.compute()),
                "iou": {int(v): float(per[i]) for i, v in enumerate(self.values) if self.seen[i]}}


def _coco_gt(gts: list[list[Instance]], sizes, categories: list[dict], keypoints: bool):
    from pycocotools.coco import COCO

    images, anns = [], []
    for i, (insts, (h, w)) in enumerate(zip(gts, sizes)):
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for inst in insts:
            rle = encode_rle(inst.mask)
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(inst.category_id),
                   "segmentation": rle, "area": float(inst.mask.sum()), "iscrowd": 0, "bbox": rle_bbox(rle)}
            if keypoints:
                kp = np.zeros((17, 3), np.float32) if inst.keypoints is None else np.asarray(inst.keypoints, np.float32)
                kp = kp.copy()
                kp[kp[:, 2] == 0] = 0
                ann["keypoints"] = [float(x) for x in kp.reshape(-1)]
                ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
            anns.append(ann)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": int(c["id"]), "name": c["name"], **({"keypoints": c["keypoints"]} if c.get("keypoints") else {})}
                                   for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_eval(gt, dets: list[dict], iou_type: str) -> np.ndarray:
    """COCOeval's 12 summary figures; NaN where there is nothing to score (no ground truth that
    counts: none at all, or, for keypoints, no person with a labelled keypoint), which the
    evaluation reports as null, not as an AP of 0."""
    from pycocotools.cocoeval import COCOeval

    if not gt.getAnnIds():
        return np.full(12, np.nan)
    if not dets:
        scorable = any(a.get("num_keypoints", 1) > 0 for a in gt.dataset["annotations"])
        return np.zeros(12) if scorable else np.full(12, np.nan)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.where(ev.stats < 0, np.nan, ev.stats)  # -1 = "no ground truth (in this area range)"


def mask_ap(gts: list[list[Instance]], preds: list[list[Instance]], sizes, categories: list[dict]) -> dict:
    """COCO mask AP (IoU .50:.95) and AP50. ``preds`` instances need ``score``."""
    gt = _coco_gt(gts, sizes, categories, keypoints=False)
    dets = []
    for i, insts in enumerate(preds):
        for inst in insts:
            rle = encode_rle(inst.mask)
            dets.append({"image_id": i + 1, "category_id": int(inst.category_id), "segmentation": rle,
                         "score": float(inst.score if inst.score is not None else 1.0)})
    stats = _coco_eval(gt, dets, "segm")
    return {"mask_ap": float(stats[0]), "mask_ap50": float(stats[1])}


def keypoint_ap(gts: list[list[Instance]], preds: list[list[Instance]], sizes, categories: list[dict]) -> dict:
    """COCO keypoint AP (OKS .50:.95) and AP50 over the people (categories with keypoints)."""
    people = [c for c in categories if c.get("keypoints")]
    ids = {int(c["id"]) for c in people}
    gts = [[g for g in insts if g.category_id in ids] for insts in gts]
    gt = _coco_gt(gts, sizes, people, keypoints=True)
    dets = []
    for i, insts in enumerate(preds):
        for inst in insts:
            if inst.category_id not in ids or inst.keypoints is None:
                continue
            kp = np.asarray(inst.keypoints, np.float32).copy()
            kp[:, 2] = 1  # COCOeval scores x, y only; v of detections is not used
            dets.append({"image_id": i + 1, "category_id": int(inst.category_id),
                         "keypoints": [float(x) for x in kp.reshape(-1)],
                         "score": float(inst.score if inst.score is not None else 1.0)})
    stats = _coco_eval(gt, dets, "keypoints")
    return {"keypoint_ap": float(stats[0]), "keypoint_ap50": float(stats[1])}


class DepthErrors:
    def __init__(self):
        self.rows: list[tuple[float, float, float]] = []

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in size")
        valid = target > 0
        if not valid.any():
            return
        p = np.maximum(np.asarray(pred, np.float64)[valid], 1e-6)
        g = np.asarray(target, np.float64)[valid]
        abs_rel = float(np.mean(np.abs(p - g) / g))
        rmse = float(np.sqrt(np.mean((p - g) ** 2)))
        delta1 = float(np.mean(np.maximum(p / g, g / p) < 1.25))
        self.rows.append((abs_rel, rmse, delta1))

    def compute(self) -> dict:
        if not self.rows:
            return {"abs_rel": float("nan"), "rmse": float("nan"), "delta1": float("nan")}
        a = np.mean(np.array(self.rows), 0)
        return {"abs_rel": float(a[0]), "rmse": float(a[1]), "delta1": float(a[2])}
