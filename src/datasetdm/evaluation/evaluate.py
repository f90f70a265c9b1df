"""Evaluate a trained decoder on a labelled folder (held-out real images).

Inputs are made exactly as in training (``datasetdm.training``): the same features (backbone
hypercolumns at t = 1, or raw pixels), the same kind of prompt (the image's caption, or the template
naming the classes of the image, as the decoder's config records) and no augmentation. Predictions are scored
against the labels at the images' own size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from datasetdm.decoder.checkpoint import decoder_config, load_decoder
from datasetdm.errors import DatasetdmError
from datasetdm.evaluation.metrics import DepthErrors, SemanticIoU, instance_errors, keypoint_ap, mask_ap
from datasetdm.io import sample_seed, write_json_atomic

KEYS = ("miou", "mask_ap", "mask_ap50", "abs_rel", "rmse", "delta1", "keypoint_ap")


def default_metrics_path(ckpt, data_dir) -> Path:
    """Where ``datasetdm evaluate`` writes its figures without --out: beside the checkpoint, not in it
    (generation records the checkpoint's digest, which must not change)."""
    ckpt = Path(ckpt)
    return ckpt.parent / f"{ckpt.name}.eval-{Path(data_dir).resolve().name}.json"


class Scores:
    """Accumulates one task's metrics over predicted/ground-truth LabelledSample fields."""

    def __init__(self, task: str, categories: list[dict], held_out=(), label_scores=()):
        self.task, self.categories, self.held_out = task, categories, list(held_out)
        self.label_scores = list(label_scores)
        self.sem = SemanticIoU([c["id"] for c in categories]) if task in ("semantic", "open-vocab") else None
        self.depth = DepthErrors() if task == "depth" else None
        self.gts, self.preds, self.sizes = [], [], []
        self.n = 0

    def add(self, sample, pred: dict) -> None:
        """``pred`` at the sample's size (see ``resize_prediction``)."""
        self.n += 1
        if self.sem is not None:
            self.sem.update(pred["semantic"], sample.semantic)
        if self.depth is not None:
            self.depth.update(pred["depth"], sample.depth)
        if self.task in ("instance", "pose"):
            self.gts.append(sample.instances or [])
            self.preds.append(pred["instances"])
            self.sizes.append(sample.size)

    def compute(self) -> dict:
        metrics: dict = {"task": self.task, "n_images": self.n}
        if self.sem is not None:
            r = self.sem.compute()
            metrics["miou"] = r["miou"]
            names = {c["id"]: c["name"] for c in self.categories}
            metrics["iou"] = {("background" if k == 0 else names[k]): v for k, v in r["iou"].items()}
            if self.held_out:
                unseen = [v for k, v in metrics["iou"].items() if k in self.held_out]
                seen = [v for k, v in metrics["iou"].items() if k not in self.held_out]
                metrics["miou_unseen"] = float(np.mean(unseen)) if unseen else float("nan")
                metrics["miou_seen"] = float(np.mean(seen)) if seen else float("nan")
        if self.depth is not None:
            metrics.update(self.depth.compute())
        if self.task == "instance":
            from datasetdm.labelers.decoder import DEFAULT_MIN_INSTANCE_SCORE

            metrics.update(mask_ap(self.gts, self.preds, self.sizes, self.categories))
            # what the labeler would get wrong: the instances it keeps, object by object
            metrics["label_errors"] = instance_errors(self.gts, self.preds, DEFAULT_MIN_INSTANCE_SCORE)
            if self.label_scores:  # other thresholds, to choose generate's --min-instance-score
                metrics["label_errors_at"] = {f"{t:g}": instance_errors(self.gts, self.preds, t)
                                              for t in self.label_scores}
        if self.task == "pose":
            people = [c for c in self.categories if c.get("keypoints")]
            metrics.update(keypoint_ap(self.gts, self.preds, self.sizes, people))
            metrics.update(mask_ap(self.gts, self.preds, self.sizes, people))
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def resize_prediction(pred: dict, from_size, to_size) -> dict:
    """A prediction made at ``from_size`` (H, W) brought to ``to_size``: nearest for maps and masks,
    keypoints rescaled (pixel-centre convention of ``decoder/losses.gaussian_heatmaps``)."""
    if tuple(from_size) == tuple(to_size):
        return pred
    out = dict(pred)
    for key in ("semantic", "depth"):
        if pred.get(key) is not None:
            out[key] = _resize_nearest(pred[key], to_size)
    for inst in pred.get("instances") or []:
        inst.mask = _resize_nearest(inst.mask.astype(np.uint8), to_size).astype(bool)
        if inst.keypoints is not None:
            inst.keypoints[:, 0] = (inst.keypoints[:, 0] + 0.5) * to_size[1] / from_size[1] - 0.5
            inst.keypoints[:, 1] = (inst.keypoints[:, 1] + 0.5) * to_size[0] / from_size[0] - 0.5
    return out


def evaluate_decoder(ckpt, data_dir, out=None, backbone_source=None, n_images: int | None = None,
                     batch_size: int = 16, seed: int = 0, show_progress: bool = False, device="cpu",
                     dtype=None, label_scores=()) -> dict:
    """Score the decoder checkpoint ``ckpt`` on the labelled folder ``data_dir``; write the figures to
    ``out`` (JSON) when given. Returns them: ``task``, ``n_images``, ``features`` and those of
    ``KEYS`` that apply (plus per-class ``iou``, ``keypoint_ap50``; open-vocab with held-out classes:
    ``miou_seen`` and ``miou_unseen``; instance: ``label_errors``, ``metrics.instance_errors`` of the
    instances a labeler keeps; with ``label_scores``, also ``label_errors_at`` each of those thresholds)."""
    from datasetdm.backbone.device import placement

    placement(device, dtype)  # an absent device or a bad dtype: refused before any work
    cfg = decoder_config(ckpt)
    if label_scores and cfg.task != "instance":
        raise DatasetdmError(f"--label-scores: label errors are measured for instance decoders; {ckpt} is {cfg.task}")
    if any(not 0 <= t <= 1 for t in label_scores):
        raise DatasetdmError(f"--label-scores: thresholds are scores in [0, 1], got {list(label_scores)}")
    categories, batches = decoder_predictions(ckpt, data_dir, backbone_source, n_images, batch_size, seed,
                                              show_progress, device, dtype)
    scores = Scores(cfg.task, categories, cfg.held_out if cfg.task == "open-vocab" else (), label_scores)
    for samples, preds in batches:
        for s, p in zip(samples, preds):
            scores.add(s, p)
    metrics = {**scores.compute(), "features": cfg.features}
    if out is not None:
        write_json_atomic(out, metrics)
    return metrics


def decoder_predictions(ckpt, data_dir, backbone_source=None, n_images: int | None = None, batch_size: int = 16,
                        seed: int = 0, show_progress: bool = False, device="cpu", dtype=None):
    """The decoder ``ckpt``'s predictions on the labelled folder ``data_dir``'s images, read as its
    training read them (the image noised to the decoder's timestep, a seeded noise per image):
    ``(categories, batches)``, the batches an iterator of (samples, predictions at the samples'
    size). Folder and decoder are checked against each other first."""
    from datasetdm.decoder.inputs import RAW_PIXELS
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.training import (
        augment,
        backbone_from_record,
        check_task_data,
        folder_categories,
        load_feature_source,
        prompt_for,
    )

    from datasetdm.backbone.device import placement

    device, dtype = placement(device, dtype)  # an absent device or a bad dtype: refused before any work
    cfg = decoder_config(ckpt)
    if n_images is not None and n_images < 1:
        raise DatasetdmError(f"--n-images must be at least 1, got {n_images}")
    folder = read_labelled_folder(data_dir)
    check_task_data(folder, cfg.task, data_dir)
    categories = folder_categories(folder)
    known = {c["id"]: c["name"] for c in cfg.categories}
    where = Path(data_dir) / "annotations.json"
    for c in categories:
        if c["id"] in known and known[c["id"]] != c["name"]:
            raise DatasetdmError(f"{where}: category {c['id']} is {c['name']!r} here but {known[c['id']]!r} in {ckpt}")
    if cfg.task != "open-vocab":
        extra_ids = {c["id"] for c in categories} - set(known)
        if extra_ids:
            raise DatasetdmError(f"{where}: category ids {sorted(extra_ids)} are unknown to decoder {ckpt}")
        categories = cfg.categories
    stored = {c["name"]: i for i, c in enumerate(cfg.categories)}
    new_names = cfg.task == "open-vocab" and cfg.name_dropout == 0 and any(c["name"] not in stored for c in categories)
    if backbone_source is None:  # the one it was trained on
        backbone_source = backbone_from_record(cfg.backbone.get("text_encoder" if cfg.features == RAW_PIXELS else "source"))
    source = load_feature_source(cfg.features, categories, backbone_source, need_text=new_names, device=device,
                                 dtype=dtype)
    decoder = load_decoder(ckpt, backbone=source.fingerprint, map_location=device)
    decoder.precision = dtype  # the decoder in the backbone's precision (autocast)
    predictor = source.predictor({cfg.task: decoder})  # inputs made as training's cache makes them
    names = [c["name"] for c in categories]

    kw = {}
    if cfg.task == "open-vocab":
        emb = decoder.head.embeddings_for(names, source.text_embeddings if new_names else None)
        kw = {"text_embeddings": emb, "class_index": list(range(len(categories))),
              "class_ids": [c["id"] for c in categories]}

    n = len(folder) if n_images is None else min(n_images, len(folder))
    size = tuple(cfg.image_size)

    def batches():
        progress = None
        if show_progress:
            from datasetdm.progress import progress_bar

            progress = progress_bar()
            progress.add_task("evaluate", total=n)
            progress.start()
        try:
            for b in range(0, n, batch_size):
                samples = [folder[i] for i in range(b, min(n, b + batch_size))]
                views = [augment(s, None, size) for s in samples]  # the decoder's size (a no-op when equal)
                prompts = [prompt_for(v, categories, mode=cfg.prompt) for v in views]
                seeds = [sample_seed(seed, b + j, "noise") for j in range(len(views))]
                predictor.set_images([v.image for v in views], prompts, seeds, timestep=cfg.timestep)
                preds = predictor.predict(cfg.task, names=names, **kw)
                yield samples, [resize_prediction(p, size, s.size) for s, p in zip(samples, preds)]
                if progress:
                    progress.advance(progress.task_ids[0], len(samples))
        finally:
            if progress:
                progress.stop()

    return categories, batches()


def _resize_nearest(a: np.ndarray, size) -> np.ndarray:
    if a.shape[:2] == tuple(size):
        return a
    from PIL import Image

    h, w = size
    return np.asarray(Image.fromarray(a).resize((w, h), Image.NEAREST))


def headline(metrics: dict) -> dict:
    """The one-line summary the CLI prints last: the standard keys that apply."""
    return {k: metrics[k] for k in KEYS if k in metrics}
