"""Evaluate a trained decoder on a labelled folder (held-out real images).

Inputs are made exactly as in training (``datasetdm.training``): the same features (backbone
hypercolumns at t = 1, or raw pixels), the same prompt template naming the classes of the image —
as a generation prompt names the classes it asks for — and no augmentation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from datasetdm.decoder.checkpoint import check_compatible, load_decoder, read_config
from datasetdm.decoder.build import DecoderConfig
from datasetdm.errors import DatasetdmError
from datasetdm.evaluation.metrics import DepthErrors, SemanticIoU, keypoint_ap, mask_ap
from datasetdm.io import sample_seed, write_json_atomic

KEYS = ("miou", "mask_ap", "mask_ap50", "abs_rel", "rmse", "delta1", "keypoint_ap")


def evaluate_decoder(ckpt, data_dir, out=None, backbone_source=None, n_images: int | None = None,
                     batch_size: int = 16, seed: int = 0) -> dict:
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.training import RAW_PIXELS, _categories, augment, check_task_data, load_feature_source, prompt_for

    cfg = DecoderConfig.from_dict(read_config(ckpt)["decoder"])
    folder = read_labelled_folder(data_dir)
    check_task_data(folder, cfg.task, data_dir)
    categories = _categories(folder)
    known = {c["id"]: c["name"] for c in cfg.categories}
    for c in categories:
        if c["id"] in known and known[c["id"]] != c["name"]:
            raise DatasetdmError(f"{data_dir}: category {c['id']} is {c['name']!r} here but {known[c['id']]!r} in {ckpt}")
    if cfg.task != "open-vocab":
        extra_ids = {c["id"] for c in categories} - set(known)
        if extra_ids:
            raise DatasetdmError(f"{data_dir}: category ids {sorted(extra_ids)} are unknown to decoder {ckpt}")
        categories = cfg.categories
    source = load_feature_source(cfg.features, cfg.categories if cfg.task != "open-vocab" else categories,
                                 backbone_source or (None if cfg.features == RAW_PIXELS else cfg.backbone.get("source")),
                                 need_text=False)
    check_compatible(ckpt, cfg, backbone_fingerprint=source.fingerprint)
    decoder, extra, _ = load_decoder(ckpt, backbone_fingerprint=source.fingerprint)

    kw = {}
    if cfg.task == "open-vocab":
        names = [c["name"] for c in categories]
        stored = {c["name"]: i for i, c in enumerate(cfg.categories)}
        if "text_embeddings" in extra and all(n in stored for n in names):
            emb = extra["text_embeddings"][[stored[n] for n in names]]
        else:  # class names the decoder never saw: embed them with the backbone's text encoder
            emb = source.text_embeddings(names)
        kw = {"text_embeddings": emb, "class_index": list(range(len(categories))),
              "class_ids": [c["id"] for c in categories]}

    n = len(folder) if n_images is None else min(n_images, len(folder))
    size = tuple(cfg.image_size)
    sem = SemanticIoU([c["id"] for c in categories]) if cfg.task in ("semantic", "open-vocab") else None
    depth = DepthErrors() if cfg.task == "depth" else None
    gts, preds, sizes = [], [], []
    for b in range(0, n, batch_size):
        samples = [folder[i] for i in range(b, min(n, b + batch_size))]
        views = [augment(s, None, size) if s.size != size else s for s in samples]
        prompts = [prompt_for(v, categories) for v in views]
        inp = source.extract([v.image for v in views], prompts, [sample_seed(seed, b + j, "noise") for j in range(len(views))],
                             timestep=cfg.timestep)
        with torch.no_grad():
            outs = decoder.predict(inp.to(dtype=torch.float32), **kw)
        for s, v, p in zip(samples, views, outs):
            # score against the original labels: bring predictions back to the sample's size
            if sem is not None:
                sem.update(_resize_nearest(p["semantic"], s.size), s.semantic)
            if depth is not None:
                depth.update(_resize_nearest(p["depth"], s.size), s.depth)
            if "instances" in p:
                for inst in p["instances"]:
                    inst.mask = _resize_nearest(inst.mask.astype(np.uint8), s.size).astype(bool)
                    if inst.keypoints is not None and s.size != size:
                        inst.keypoints[:, 0] = (inst.keypoints[:, 0] + 0.5) * s.size[1] / size[1] - 0.5
                        inst.keypoints[:, 1] = (inst.keypoints[:, 1] + 0.5) * s.size[0] / size[0] - 0.5
                gts.append(s.instances or [])
                preds.append(p["instances"])
                sizes.append(s.size)

    metrics: dict = {"task": cfg.task, "n_images": n, "features": cfg.features}
    if sem is not None:
        r = sem.compute()
        metrics["miou"] = r["miou"]
        names = {c["id"]: c["name"] for c in categories}
        metrics["iou"] = {("background" if k == 0 else names[k]): v for k, v in r["iou"].items()}
        if cfg.task == "open-vocab" and cfg.held_out:
            unseen = [v for k, v in metrics["iou"].items() if k in cfg.held_out]
            seen = [v for k, v in metrics["iou"].items() if k not in cfg.held_out]
            metrics["miou_unseen"] = float(np.mean(unseen)) if unseen else float("nan")
            metrics["miou_seen"] = float(np.mean(seen)) if seen else float("nan")
    if depth is not None:
        metrics.update(depth.compute())
    if cfg.task == "instance":
        metrics.update(mask_ap(gts, preds, sizes, categories))
    if cfg.task == "pose":
        metrics.update(keypoint_ap(gts, preds, sizes, categories))
        metrics.update(mask_ap(gts, preds, sizes, [c for c in categories if c.get("keypoints")]))
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    if out is not None:
        write_json_atomic(out, metrics)
    return metrics


def _resize_nearest(a: np.ndarray, size) -> np.ndarray:
    if a.shape[:2] == tuple(size):
        return a
    from PIL import Image

    h, w = size
    mode = "F" if a.dtype == np.float32 else None
    return np.asarray(Image.fromarray(a, mode=mode).resize((w, h), Image.NEAREST))


def headline(metrics: dict) -> dict:
    """The one-line summary the CLI prints last: the standard keys that apply."""
    return {k: metrics[k] for k in KEYS if k in metrics}
