"""Downstream check (paper §4, Table 4): is the generated dataset worth training on?

An ordinary semantic segmenter (``segmenter.UNetSegmenter``: pixels in, no diffusion features) is
trained three times with the same recipe and steps: on (a) the real labelled images, (b) the
synthetic dataset only, (c) both, with every batch drawn half from each so the 100 real images
are not drowned by thousands of synthetic ones. Each is evaluated on held-out world test scenes.
Synthetic class ids are matched to the real ones by class name; classes the real data does not
have are ignored (255) in training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from datasetdm.errors import DatasetdmError
from datasetdm.evaluation.metrics import SemanticIoU
from datasetdm.evaluation.segmenter import SegmenterTrainConfig, predict_segmenter, train_segmenter
from datasetdm.formats.labelled_folder import LabelledFolder, read_labelled_folder
from datasetdm.formats.sample import IGNORE_INDEX, Category
from datasetdm.io import write_json_atomic


@dataclass
class DownstreamConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the segmenter's forward (see SegmenterTrainConfig.bf16)


def load_semantic(folder: LabelledFolder, reference: list[Category], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,H,W,3) uint8, semantic (N,H,W) uint8) with ids mapped by name onto ``reference``."""
    if "semantic" not in folder.tasks:
        raise DatasetdmError(f"{folder.root}: {what} data has no semantic masks")
    by_name = {c.name: c.id for c in reference}
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[0] = 0
    for c in folder.categories:
        if c.name in by_name:
            lut[c.id] = by_name[c.name]
    images, masks = [], []
    for sample in folder:
        images.append(np.asarray(sample.image, np.uint8))
        masks.append(lut[np.asarray(sample.semantic, np.uint8)])
    if not images:
        raise DatasetdmError(f"{folder.root}: {what} data is empty")
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise DatasetdmError(f"{folder.root}: {what} images differ in size {sorted(shapes)}; the segmenter needs one size")
    return np.stack(images), np.stack(masks)


def _train(images, masks, num_classes: int, config: DownstreamConfig, progress=None):
    cfg = SegmenterTrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                               bf16=config.bf16)
    return train_segmenter(images, {"semantic": masks}, {"semantic": num_classes}, cfg, progress=progress)


def evaluate_segmenter(model, images: np.ndarray, masks: np.ndarray, category_ids: list[int]) -> dict:
    metric = SemanticIoU(category_ids)
    pred = predict_segmenter(model, images)["semantic"]
    for p, t in zip(pred, masks):
        metric.update(p, t)
    return metric.compute()


def _digest(*arrays: np.ndarray, extra: dict | None = None) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(extra or {}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def run_downstream(
    real: str | Path,
    synthetic: str | Path,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    categories: list[Category],
    config: DownstreamConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Train (a) real, (b) synthetic, (c) joint; return their test mIoU and per-class IoU.

    With ``cache_dir``, each model's test figures are stored under a hash of everything that
    decides them (its training images and labels, the test set, the recipe), so an interrupted
    run resumes after the last finished model, and the real-only model is trained once for any
    number of synthetic datasets scored on the same test set.
    """
    config = config or DownstreamConfig()
    num_classes = max(c.id for c in categories) + 1
    ids = [c.id for c in categories]
    real_x, real_y = load_semantic(read_labelled_folder(real), categories, "real")
    syn_x, syn_y = load_semantic(read_labelled_folder(synthetic), categories, "synthetic")
    if real_x.shape[1:3] != syn_x.shape[1:3] or real_x.shape[1:3] != test_images.shape[1:3]:
        raise DatasetdmError(
            f"{synthetic}: image size {syn_x.shape[1:3]} differs from real {real_x.shape[1:3]} "
            f"or test {test_images.shape[1:3]}"
        )
    # real images repeated so that about half of every joint batch is real, whatever the sizes
    repeat = max(1, round(len(syn_x) / len(real_x)))
    joint_x = np.concatenate([np.tile(real_x, (repeat, 1, 1, 1)), syn_x])
    joint_y = np.concatenate([np.tile(real_y, (repeat, 1, 1)), syn_y])
    # what, besides its training data, decides a model's figures: test set, classes, recipe
    scored_on = _digest(test_images, test_masks, extra={"ids": ids, "config": asdict(config), "version": 1})
    results = {}
    for name, (x, y, n) in {
        "real": (real_x, real_y, len(real_x)),
        "synthetic": (syn_x, syn_y, len(syn_x)),
        "joint": (joint_x, joint_y, len(real_x) + len(syn_x)),
    }.items():
        cached = Path(cache_dir) / f"segmenter-{_digest(x, y, extra={'scored_on': scored_on})}.json" \
            if cache_dir is not None else None
        if cached is not None and cached.exists():
            stored = json.loads(cached.read_text())
            results[name] = {**stored, "iou": {int(k): v for k, v in stored["iou"].items()}}  # JSON keys are text
            continue
        report = (lambda step, loss, name=name: progress(name, step + 1, config.steps)) if progress else None
        model = _train(x, y, num_classes, config, progress=report)
        metrics = evaluate_segmenter(model, test_images, test_masks, ids)
        results[name] = {"images": int(n), **metrics}
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cached, results[name])
    return {
        "real_miou": results["real"]["miou"],
        "synthetic_miou": results["synthetic"]["miou"],
        "joint_miou": results["joint"]["miou"],
        "n_real": results["real"]["images"],
        "n_synthetic": results["synthetic"]["images"],
        "n_test": int(len(test_images)),
        "per_class": {k: v["iou"] for k, v in results.items()},
        "config": asdict(config),
    }


def world_test_set(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, list[Category]]:
    """World test-split scenes rendered in memory: images, semantic masks, categories."""
    from datasetdm.world.render import CATEGORIES, render_scene

    scenes = [render_scene("test", seed, i) for i in range(n)]
    return (np.stack([s.image for s in scenes]), np.stack([s.semantic for s in scenes]), list(CATEGORIES))


def format_table(result: dict, categories: list[Category]) -> str:
    """The paper's Table 4 layout: one row per training set, mIoU and per-class IoU."""
    names = [c.name for c in categories]
    head = f"{'training data':<22}{'images':>8}{'mIoU':>8}  " + " ".join(f"{n[:6]:>6}" for n in names)
    rows = [head, "-" * len(head)]
    for key, label in (("real", "real"), ("synthetic", "synthetic only"), ("joint", "real + synthetic")):
        per = result["per_class"][key]
        cells = " ".join(f"{per[c.id]:6.3f}" if c.id in per else f"{'-':>6}" for c in categories)
        n = {"real": result["n_real"], "synthetic": result["n_synthetic"]}.get(key, result["n_real"] + result["n_synthetic"])
        rows.append(f"{label:<22}{n:>8}{result[f'{key}_miou']:>8.3f}  {cells}")
    return "\n".join(rows)


def build_and_run(out: str | Path, test_seed: int, n_test: int = 500, real: Path | None = None,
                  synthetic: Path | None = None, n_synthetic: int = 1000, labeler: str = "decoder",
                  backbone: str | None = None, config: DownstreamConfig | None = None,
                  decoder_iterations: int = 1500, seed: int = 0, cache_dir: Path | None = None,
                  min_pixel_confidence: float | None = None) -> dict:
    """The `datasetdm downstream` command: build what is not given, run, write ``downstream.json``.
    Holds ``out``'s lock (``io.output_lock``): two runs would share its caches."""
    from datasetdm.io import output_lock

    with output_lock(out):
        return _build_and_run(out, test_seed, n_test, real, synthetic, n_synthetic, labeler, backbone, config,
                              decoder_iterations, seed, cache_dir, min_pixel_confidence)


def _build_and_run(out, test_seed, n_test, real, synthetic, n_synthetic, labeler, backbone, config,
                   decoder_iterations, seed, cache_dir, min_pixel_confidence) -> dict:
    from rich.console import Console

    from datasetdm.backbone.loader import embedded_backbone_path
    from datasetdm.formats.export import export_shards
    from datasetdm.generation.defaults import GENERATION_BATCH, GENERATION_STEPS, GUIDANCE_SCALE
    from datasetdm.generation.setup import generate_labelled
    from datasetdm.labelers.registry import LABELERS
    from datasetdm.io import write_json_atomic
    from datasetdm.training import train_decoders
    from datasetdm.world.folders import render_world_folder, world_prompt_file
    from datasetdm.world.render import CATEGORIES

    say = Console(stderr=True).print

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if labeler not in LABELERS:
        raise DatasetdmError(f"--labeler {labeler!r}: choose one of {', '.join(LABELERS)}")
    real = Path(real) if real else render_world_folder(out / "real", "train", seed, 100)
    if synthetic is None:
        source = backbone or str(embedded_backbone_path())
        prompts = world_prompt_file(out / "prompts.txt", n_synthetic, seed)
        shards = out / f"shards-{labeler}"
        decoders = []
        if labeler == "decoder":
            decoders = list(train_decoders(real, out / "decoders", ["semantic"], source, decoder_iterations,
                                           log=say).values())
        generate_labelled(shards, labeler=labeler, backbone=source, decoders=decoders,
                          categories=list(CATEGORIES) if labeler == "attention" else (), prompts=prompts,
                          n=n_synthetic, seed=seed, steps=GENERATION_STEPS, guidance=GUIDANCE_SCALE,
                          batch_size=GENERATION_BATCH, min_pixel_confidence=min_pixel_confidence)
        synthetic = out / f"synthetic-{labeler}"
        export_shards(shards, synthetic, overwrite=True)
    test_images, test_masks, categories = world_test_set(test_seed, n_test)
    say(f"downstream: real {real}, synthetic {synthetic}, {n_test} test scenes (seed {test_seed})")
    from datasetdm.progress import progress_bar

    with progress_bar(transient=True) as bar:
        tasks = {}

        def report(name, step, total):
            if name not in tasks:
                tasks[name] = bar.add_task(f"segmenter on {name}", total=total)
            bar.update(tasks[name], completed=step)

        result = run_downstream(real, synthetic, test_images, test_masks, categories, config, progress=report,
                                cache_dir=cache_dir if cache_dir is not None else out / "cache")
    result.update({"test_seed": test_seed, "labeler": labeler, "real": str(real), "synthetic": str(synthetic)})
    write_json_atomic(out / "downstream.json", result)
    headline = {k: round(result[k], 4) for k in ("real_miou", "synthetic_miou", "joint_miou")}
    headline.update({"n_real": result["n_real"], "n_synthetic": result["n_synthetic"], "n_test": n_test,
                     "test_seed": test_seed, "labeler": labeler})
    return {"table": format_table(result, categories), **headline}
