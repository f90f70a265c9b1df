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


# the kinds of a ground-truth object's outcome in ``instance_errors``, in the order they are tested
INSTANCE_OUTCOMES = ("found", "wrong_class", "merged", "split", "poorly_outlined", "missed")


def instance_errors(gts: list[list[Instance]], preds: list[list[Instance]], min_score: float = 0.0,
                    merge_cover: float = 0.5, split_part: float = 0.1, hit_iou: float = 0.5,
                    touch_iou: float = 0.1) -> dict:
    """What becomes of each ground-truth object in a set of predicted instances (the predictions
    scoring at least ``min_score``, as a labeler keeps them), one outcome per object, in the
    spirit of TIDE (Bolya et al., ECCV 2020) but for labels rather than ranked detections:

    - ``found``: a prediction of its class overlaps it with IoU ≥ ``hit_iou``;
    - ``wrong_class``: the best such prediction (IoU ≥ ``hit_iou``) has another class;
    - ``merged``: one prediction covers ≥ ``merge_cover`` of it and of another object;
    - ``split``: two or more predictions each cover ≥ ``split_part`` of it and together ≥ ``merge_cover``;
    - ``poorly_outlined``: the best prediction's IoU is in [``touch_iou``, ``hit_iou``);
    - ``missed``: no prediction reaches IoU ``touch_iou``.

    Predictions are counted too: ``spurious`` (IoU < ``touch_iou`` with every object: labelled
    background) and ``duplicate`` (IoU ≥ ``hit_iou`` with an object a higher-scoring prediction
    already took). Returns the objects' outcome fractions, the predictions' fractions, and the
    mean number of objects and predictions per image."""
    counts = dict.fromkeys(INSTANCE_OUTCOMES, 0)
    spurious = duplicate = n_pred = n_gt = 0
    for truth, pred in zip(gts, preds):
        pred = sorted((p for p in pred if p.score is None or p.score >= min_score),
                      key=lambda p: -(p.score if p.score is not None else 1.0))
        n_gt, n_pred = n_gt + len(truth), n_pred + len(pred)
        if not truth:
            spurious += len(pred)
            continue
        t = np.stack([g.mask.reshape(-1) for g in truth]).astype(np.float64)  # (T, HW)
        if pred:
            p = np.stack([q.mask.reshape(-1) for q in pred]).astype(np.float64)  # (P, HW)
            inter = p @ t.T  # (P, T)
            union = p.sum(1)[:, None] + t.sum(1)[None, :] - inter
            iou = inter / np.maximum(union, 1)
            cover = inter / np.maximum(t.sum(1)[None, :], 1)  # share of each object under each prediction
        else:
            iou = cover = np.zeros((0, len(truth)))
        for j, g in enumerate(truth):
            best = int(iou[:, j].argmax()) if len(pred) else -1
            best_iou = iou[best, j] if best >= 0 else 0.0
            covering = np.flatnonzero(cover[:, j] >= merge_cover)
            parts = cover[:, j][cover[:, j] >= split_part]
            if best_iou >= hit_iou:
                counts["found" if pred[best].category_id == g.category_id else "wrong_class"] += 1
            elif any((cover[k] >= merge_cover).sum() >= 2 for k in covering):
                counts["merged"] += 1
            elif len(parts) >= 2 and parts.sum() >= merge_cover:
                counts["split"] += 1
            elif best_iou >= touch_iou:
                counts["poorly_outlined"] += 1
            else:
                counts["missed"] += 1
        taken = set()
        for k in range(len(pred)):  # highest score first, as COCO matching
            if iou[k].max() < touch_iou:
                spurious += 1
                continue
            j = int(iou[k].argmax())
            if iou[k, j] >= hit_iou:
                if j in taken:
                    duplicate += 1
                taken.add(j)
    images = max(len(gts), 1)
    return {
        "min_score": min_score,
        "objects": {k: v / max(n_gt, 1) for k, v in counts.items()},
        "predictions": {"spurious": spurious / max(n_pred, 1), "duplicate": duplicate / max(n_pred, 1)},
        "objects_per_image": n_gt / images,
        "predictions_per_image": n_pred / images,
    }
