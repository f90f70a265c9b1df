"""Downstream check (paper §4, Table 4): is the generated dataset worth training on?

An ordinary semantic segmenter (``segmenter.UNetSegmenter``: pixels in, no diffusion features) is
trained three times with the same recipe and steps: on (a) the real labelled images, (b) the
synthetic dataset only, (c) both. Each is evaluated on held-out world test scenes. The joint model
(``JOINT_RECIPES``) is by default trained on the synthetic set for half the steps and fine-tuned on
the real set for the other half ("finetune"); "mixed" draws every batch half from each, so the 100
real images are not drowned by thousands of synthetic ones, and is the default where the synthetic
set carries classes the real set lacks (zero-shot: ``default_joint``). Same steps either way.
Synthetic class ids are matched to the real ones by class name; classes the real data does not
have are ignored (255) in training.

Every task of the paper's Table 2 is measured the same way (``--task``): semantic segmentation
with the segmenter above (mIoU), and depth, instances and pose with the ordinary models of
``task_models`` (AbsRel/δ1, mask AP/AP50, keypoint AP), trained on real, synthetic and joint data
with one recipe and scored by ``evaluate``'s metrics on held-out world test scenes.

Long-tail (paper §4, Table 7): ``long_tail`` makes the real few-shot set long-tailed (head classes
in 20 images, tail classes in 2: ``world.folders.long_tail_scenes``), prompts the generation with
that set's captions (so the synthetic data inherits the imbalance) unless ``class_quota`` plans
them so every class is named by that many samples; the result adds head and tail mIoU.

Zero-shot (paper §4, Table 7): ``zero_shot`` names unseen classes. The real few-shot set keeps
the labels of the seen classes only (unseen pixels ignore), an open-vocabulary decoder is trained
on it with the unseen classes held out, the generation is prompted with every class (the world's
captions) and labelled by that decoder with every class name; the result adds seen, unseen and
harmonic mIoU per model.

Domain shift (supplementary Table 9): ``domain`` ("grass:sunny") takes the real few-shot scenes
from that setting and lighting only, prompts the generation across all settings (the world's
captions) and scores every model on test scenes from the other settings and lightings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from datasetdm.decoder.heads import SEMANTIC_HEADS
from datasetdm.errors import DatasetdmError
from datasetdm.evaluation.metrics import SemanticIoU
from datasetdm.evaluation.segmenter import SegmenterTrainConfig, predict_segmenter, train_segmenter
from datasetdm.formats.labelled_folder import LabelledFolder, read_labelled_folder
from datasetdm.formats.sample import IGNORE_INDEX, Category
from datasetdm.generation.defaults import GENERATION_STEPS, GUIDANCE_SCALE
from datasetdm.io import write_json_atomic


@dataclass
class DownstreamConfig(SegmenterTrainConfig):
    """The downstream segmenter's recipe: ``SegmenterTrainConfig`` with the check's 2000 steps."""

    steps: int = 2000


# recipe fields that entered the cache keys' version 1 later: a key holds them only when they
# differ from these values, so figures cached before they existed are still found
_LATER_FIELDS = {"segmenter": {"weight_decay": 1e-4, "flip": True}, "task": {"bf16": False, "zero_init_heads": False}}


def _recipe_key(config, kind: str) -> dict:
    later = _LATER_FIELDS[kind]
    return {k: v for k, v in asdict(config).items() if k not in later or v != later[k]}


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


def _train(images, masks, num_classes: int, config: DownstreamConfig, progress=None, init=None):
    return train_segmenter(images, {"semantic": masks}, {"semantic": num_classes}, config, progress=progress,
                           init=init)


class JointRecipe(NamedTuple):
    name: str  # one of JOINT_RECIPES
    real_share: float  # the real set's share of the steps ("finetune"); "mixed": half of every batch
    synthetic_joints: bool = True  # pose: whether the synthetic people's keypoints are trained on


def joint_recipe(joint: str, task: str | None = None) -> JointRecipe:
    """``--joint`` as a ``JointRecipe``: "finetune" is ("finetune", 0.5), "finetune:0.75"
    fine-tunes on real for three quarters of the steps, "mixed" is ("mixed", 0.5) (half of every
    batch real). A "+real-joints" suffix (pose) learns the joints from the real set only: the
    synthetic people still teach finding and outlining people, their keypoints are not trained on.
    With ``task``, a modifier that does not apply to it is an error."""
    base, plus, modifier = joint.partition("+")
    if plus and modifier != "real-joints":
        raise DatasetdmError(f"--joint {joint!r}: the only modifier is +real-joints (pose)")
    if plus and task is not None and task != "pose":
        raise DatasetdmError(f"--joint {joint!r}: +real-joints is for --task pose (the task is {task})")
    name, colon, share = base.partition(":")
    if name not in JOINT_RECIPES or (colon and name != "finetune"):
        raise DatasetdmError(f"--joint {joint!r}: choose one of {', '.join(JOINT_RECIPES)} (or finetune:R, R the "
                             "share of the steps on the real set; +real-joints for pose)")
    try:
        real_share = float(share) if colon else 0.5
    except ValueError:
        real_share = float("nan")
    if not 0 < real_share < 1:
        raise DatasetdmError(f"--joint {joint!r}: the real set's share of the steps must be between 0 and 1")
    return JointRecipe(name, real_share, not plus)


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


# the three models every downstream run compares (paper Table 2 / 4 rows)
DOWNSTREAM_MODELS = ("real", "synthetic", "joint")


def check_models(models: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in models if m not in DOWNSTREAM_MODELS]
    if unknown or not models:
        raise DatasetdmError(f"--models {','.join(models)}: choose among {', '.join(DOWNSTREAM_MODELS)}")
    return tuple(models)


def _cached_or_trained(keys: dict[str, str], cache_dir, prefix: str, models: Sequence[str],
                       train_and_score: Callable[[str], dict]) -> dict[str, dict]:
    """Each model's figures: read from ``cache_dir/{prefix}-{key}.json`` when there, else trained and
    scored (``train_and_score(name)``) and stored, when ``models`` names it; else left out. Workers
    sharing one cache folder can so split a run's models (``--models``) and meet in it."""
    results = {}
    for name, key in keys.items():
        cached = Path(cache_dir) / f"{prefix}-{key}.json" if cache_dir is not None else None
        if cached is not None and cached.exists():
            results[name] = json.loads(cached.read_text())
        elif name in models:
            results[name] = {**train_and_score(name), "torch_threads": torch.get_num_threads()}
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(cached, results[name])
    return results


def run_downstream(
    real: str | Path,
    synthetic: str | Path,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    categories: list[Category],
    config: DownstreamConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    cache_dir: str | Path | None = None,
    joint: str = "finetune",
    models: Sequence[str] = DOWNSTREAM_MODELS,
) -> dict:
    """Train (a) real, (b) synthetic, (c) joint (``joint``: one of ``JOINT_RECIPES``); return their
    test mIoU and per-class IoU.

    With ``cache_dir``, each model's test figures are stored under a hash of everything that
    decides them (its training images and labels, the test set, the recipe), so an interrupted
    run resumes after the last finished model, and the real-only model is trained once for any
    number of synthetic datasets scored on the same test set. Only the ``models`` named are
    trained; another one not in the cache is left out (its mIoU None, no per-class entry).
    """
    joint_recipe(joint, "semantic")  # checked before anything trains
    models = check_models(models)
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
    # what, besides its training data, decides a model's figures: test set, classes, recipe
    scored_on = _digest(test_images, test_masks, extra={"ids": ids, "config": _recipe_key(config, "segmenter"),
                                                         "version": 1})
    if joint == "mixed":
        # real images repeated so that about half of every joint batch is real, whatever the sizes
        repeat = max(1, round(len(syn_x) / len(real_x)))
        joint_x = np.concatenate([np.tile(real_x, (repeat, 1, 1, 1)), syn_x])
        joint_y = np.concatenate([np.tile(real_y, (repeat, 1, 1)), syn_y])
        joint_key = _digest(joint_x, joint_y, extra={"scored_on": scored_on})
    else:
        joint_key = _digest(real_x, real_y, syn_x, syn_y, extra={"scored_on": scored_on, "joint": joint})
    keys = {"real": _digest(real_x, real_y, extra={"scored_on": scored_on}),
            "synthetic": _digest(syn_x, syn_y, extra={"scored_on": scored_on}), "joint": joint_key}
    sizes = {"real": len(real_x), "synthetic": len(syn_x), "joint": len(real_x) + len(syn_x)}

    def train_and_score(name: str) -> dict:
        report = (lambda step, loss: progress(name, step + 1, config.steps)) if progress else None
        if name == "joint" and joint != "mixed":
            model = _fine_tuned(lambda x, y, cfg, **kw: _train(x, y, num_classes, cfg, **kw), (syn_x, syn_y),
                                (real_x, real_y), config, report, joint_recipe(joint).real_share)
        elif name == "joint":
            model = _train(joint_x, joint_y, num_classes, config, progress=report)
        else:
            x, y = (real_x, real_y) if name == "real" else (syn_x, syn_y)
            model = _train(x, y, num_classes, config, progress=report)
        return {"images": int(sizes[name]), **evaluate_segmenter(model, test_images, test_masks, ids)}

    results = _cached_or_trained(keys, cache_dir, "segmenter", models, train_and_score)
    for figures in results.values():
        figures["iou"] = {int(k): v for k, v in figures["iou"].items()}  # JSON keys are text
    return {
        **{f"{name}_miou": results[name]["miou"] if name in results else None for name in DOWNSTREAM_MODELS},
        "n_real": int(len(real_x)),
        "n_synthetic": int(len(syn_x)),
        "n_test": int(len(test_images)),
        "per_class": {k: v["iou"] for k, v in results.items()},
        # a model is bit-for-bit reproducible at the thread count it trained with, not across counts
        # (CPU kernels sum in another order); None: cached before the count was recorded
        "torch_threads": {k: v.get("torch_threads") for k, v in results.items()},
        "config": asdict(config),
        "joint": joint,
    }


# the metrics each task reports for real / synthetic / joint; the first is the headline
TASK_METRICS = {"semantic": ("miou",), "instance": ("mask_ap", "mask_ap50"), "depth": ("abs_rel", "delta1"),
                "pose": ("keypoint_ap", "keypoint_ap50")}
DOWNSTREAM_TASKS = tuple(TASK_METRICS)
# how the joint model uses both sets, the same number of steps as the others: "finetune" trains on
# the synthetic set for the first half of the steps and on the real set for the rest (measured on
# instances, test seed 2: mask AP 0.863 against real-only 0.812, session 22); "mixed" draws every
# batch half real, half synthetic (the recipe until session 22). "finetune:R" gives the real set a
# share R of the steps.
JOINT_RECIPES = ("finetune", "mixed")


def world_test_samples(seed: int, n: int, preset: str = "default") -> list:
    """World test-split scenes with every label (instances, keypoints, depth)."""
    from datasetdm.world.render import render_scene

    return [render_scene("test", seed, i, preset) for i in range(n)]


def _id_map(folder: LabelledFolder, reference: list[Category]) -> dict[int, int]:
    by_name = {c.name: c.id for c in reference}
    return {c.id: by_name[c.name] for c in folder.categories if c.name in by_name}


def folder_task_data(path, task: str, reference: list[Category], what: str, min_joint_score: float | None = None):
    """A labelled folder's samples as ``task``'s training data, its classes mapped onto
    ``reference`` by name; ``what`` ("real" or "synthetic") names it in errors, and real data must
    carry keypoints for pose. ``min_joint_score`` (pose): an image teaches joints only when every
    person in it with keypoints scores at least that (the decoder's person × joint confidence; a
    person without a score counts as sure) — its people still teach where people are."""
    from datasetdm.evaluation.task_models import task_data

    folder = read_labelled_folder(path)
    samples = list(folder)
    # generated data may hold no person (a pose decoder that found none): trained on as it is
    data = task_data(samples, task, reference, _id_map(folder, reference), where=f"{folder.root}: {what} data",
                     need_keypoints=what == "real")
    if min_joint_score is not None and task == "pose":
        # the score ranks a label's precision: on 258 decoder-labelled world scenes its correlation
        # with the person's OKS against the truth is 0.72 (NOTES, session 25)
        sure = np.array([all(i.score is None or i.score >= min_joint_score for i in s.instances
                             if i.keypoints is not None) for s in samples], bool)
        data = replace(data, keypoints_labelled=sure if data.keypoints_labelled is None
                       else data.keypoints_labelled & sure)
    return data


def train_joint_task_model(real, synthetic, num_classes: int, config, joint: str = "finetune",
                           progress: Callable[[int, float], None] | None = None):
    """The joint model of a task (``JOINT_RECIPES``), as many steps as the others: "finetune" trains
    on ``synthetic`` for the first half of ``config.steps`` and fine-tunes that model on ``real`` for
    the rest; "mixed" draws every batch half from each set; "+real-joints" (pose) trains no
    keypoint on the synthetic people. ``progress(step, loss)`` counts on across both halves."""
    from datasetdm.evaluation.task_models import concat_data, train_task_model

    recipe = joint_recipe(joint, real.task)  # checked before anything trains
    if not recipe.synthetic_joints:
        synthetic = replace(synthetic, keypoints_labelled=np.zeros(len(synthetic), bool))
    if recipe.name == "mixed":
        half = np.concatenate([np.full(len(real), 0.5 / len(real)), np.full(len(synthetic), 0.5 / len(synthetic))])
        return train_task_model(concat_data([real, synthetic]), num_classes, config, weights=half, progress=progress)
    return _fine_tuned(lambda data, cfg, **kw: train_task_model(data, num_classes, cfg, **kw), (synthetic,), (real,),
                       config, progress, recipe.real_share)


def _fine_tuned(train, synthetic: tuple, real: tuple, config, progress=None, real_share: float = 0.5):
    """The "finetune" joint recipe: ``train(*synthetic, config)`` for the first part of the steps,
    then ``train(*real, config)`` for the rest (``real_share`` of them), starting from that model;
    ``progress(step, loss)`` counts on across both."""
    first = replace(config, steps=int(config.steps * (1 - real_share)))
    pre = train(*synthetic, first, progress=progress)
    later = (lambda step, loss: progress(first.steps + step, loss)) if progress else None
    return train(*real, replace(config, steps=config.steps - first.steps), progress=later, init=pre.state_dict())


def run_task_downstream(
    task: str,
    real: str | Path,
    synthetic: str | Path,
    test_samples: list,
    categories: list[Category],
    config=None,
    progress: Callable[[str, int, int], None] | None = None,
    cache_dir: str | Path | None = None,
    joint: str = "finetune",
    models: Sequence[str] = DOWNSTREAM_MODELS,
) -> dict:
    """Depth, instance or pose: train the task's ordinary model (``task_models``) on (a) real,
    (b) synthetic, (c) joint data (``joint``: one of ``JOINT_RECIPES``); score each on
    ``test_samples`` with ``evaluate``'s metrics. The per-model cache and ``models`` work as in
    ``run_downstream`` (figures stored under a hash of the training data, test set and recipe)."""
    from datasetdm.evaluation.task_models import (
        TaskModelConfig,
        concat_data,
        predict_task,
        score_task,
        task_data,
        train_task_model,
    )

    if task not in TASK_METRICS or task == "semantic":
        raise DatasetdmError(f"--task {task!r}: choose one of {', '.join(DOWNSTREAM_TASKS)}")
    joint_recipe(joint, task)  # checked before anything trains
    models = check_models(models)
    config = config or TaskModelConfig()
    real_d = folder_task_data(real, task, categories, "real")
    syn_d = folder_task_data(synthetic, task, categories, "synthetic")
    test_d = task_data(test_samples, task, categories, where="test scenes")
    if real_d.images.shape[1:3] != syn_d.images.shape[1:3] or real_d.images.shape[1:3] != test_d.images.shape[1:3]:
        raise DatasetdmError(f"{synthetic}: image size {syn_d.images.shape[1:3]} differs from real "
                             f"{real_d.images.shape[1:3]} or test {test_d.images.shape[1:3]}")
    people = [c.id for c in categories if c.keypoints]
    class_ids = [c.id for c in categories] if task == "instance" else people[:1]
    num_classes = max(c.id for c in categories) + 1
    if task == "instance" and class_ids != list(range(1, num_classes)):
        raise DatasetdmError(f"categories {class_ids}: the instance model needs ids 1..{len(class_ids)}")
    scored_on = _digest(*test_d.arrays(), extra={"task": task, "ids": [c.id for c in categories],
                                                 "config": _recipe_key(config, "task"), "version": 1})
    data = {"real": real_d, "synthetic": syn_d, "joint": concat_data([real_d, syn_d])}
    # "mixed" keeps the key it had before recipes were named, so its cached figures are found
    extras = {"real": {"half_real": False}, "synthetic": {"half_real": False},
              "joint": {"half_real": True} if joint == "mixed" else {"half_real": False, "joint": joint}}
    keys = {name: _digest(*data[name].arrays(), extra={"scored_on": scored_on, **extras[name]}) for name in data}

    def train_and_score(name: str) -> dict:
        report = (lambda step, loss: progress(name, step + 1, config.steps)) if progress else None
        if name == "joint":
            model = train_joint_task_model(real_d, syn_d, num_classes, config, joint, report)
        else:
            model = train_task_model(data[name], num_classes, config, progress=report)
        preds = predict_task(model, task, test_d.images, class_ids, config)
        metrics = score_task(task, preds, test_samples, categories)
        return {"images": int(len(data[name])), **{k: v for k, v in metrics.items() if k != "task"}}

    results = _cached_or_trained(keys, cache_dir, task, models, train_and_score)
    out = {"task": task, "metric": TASK_METRICS[task][0]}
    for name in DOWNSTREAM_MODELS:
        for m in TASK_METRICS[task]:
            out[f"{name}_{m}"] = results.get(name, {}).get(m)
    out.update({"n_real": len(real_d), "n_synthetic": len(syn_d), "n_test": len(test_samples), "models": results,
                "torch_threads": {k: v.get("torch_threads") for k, v in results.items()},
                "config": asdict(config), "joint": joint})
    return out


def format_task_table(result: dict) -> str:
    """Table 2's layout for one task: one row per training set, the task's metrics."""
    metrics = TASK_METRICS[result["task"]]
    head = f"{'training data':<22}{'images':>8}" + "".join(f"{m:>14}" for m in metrics)
    rows = [head, "-" * len(head)]
    for key, label in (("real", "real"), ("synthetic", "synthetic only"), ("joint", "real + synthetic")):
        n = {"real": result["n_real"], "synthetic": result["n_synthetic"]}.get(key, result["n_real"] + result["n_synthetic"])
        cells = "".join(f"{'-':>14}" if result[f"{key}_{m}"] is None else f"{result[f'{key}_{m}']:>14.4f}"
                        for m in metrics)
        rows.append(f"{label:<22}{n:>8}{cells}")
    return "\n".join(rows)


def head_tail_miou(per_class: dict, categories: list[Category], tail: list[str]) -> dict:
    """Mean IoU over the head and the tail classes (background counts for neither), per model."""
    tail_ids = {c.id for c in categories if c.name in tail}
    out = {}
    for model, ious in per_class.items():
        head = [v for k, v in ious.items() if k != 0 and k not in tail_ids]
        rare = [v for k, v in ious.items() if k in tail_ids]
        out[f"{model}_head_miou"] = float(np.mean(head)) if head else None
        out[f"{model}_tail_miou"] = float(np.mean(rare)) if rare else None
    return out


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
        per = result["per_class"].get(key, {})  # none for a model left out (``models``)
        cells = " ".join(f"{per[c.id]:6.3f}" if c.id in per else f"{'-':>6}" for c in categories)
        n = {"real": result["n_real"], "synthetic": result["n_synthetic"]}.get(key, result["n_real"] + result["n_synthetic"])
        miou = result[f"{key}_miou"]
        rows.append(f"{label:<22}{n:>8}{'-' if miou is None else format(miou, '.3f'):>8}  {cells}")
    return "\n".join(rows)


def build_and_run(out: str | Path, test_seed: int, n_test: int = 500, real: Path | None = None,
                  synthetic: Path | None = None, n_synthetic: int = 1000, labeler: str = "decoder",
                  backbone: str | None = None, config: DownstreamConfig | None = None,
                  decoder_iterations: int | None = None, seed: int = 0, cache_dir: Path | None = None,
                  min_pixel_confidence: float | None = None, task: str = "semantic", task_config=None,
                  class_quota: int | None = None, long_tail: Sequence[str] = (), head_images: int = 20,
                  tail_images: int = 2, device: str = "auto", dtype: str | None = None,
                  domain: str | None = None, zero_shot: Sequence[str] = (), guidance: float = GUIDANCE_SCALE,
                  generation_steps: int = GENERATION_STEPS, capture_step: int = -1,
                  prompts: str | Path | None = None, semantic_head: str = "masks", decoder_seed: int = 0,
                  min_instance_score: float | None = None, joint: str | None = None,
                  models: Sequence[str] = DOWNSTREAM_MODELS) -> dict:
    """The `datasetdm downstream` command: build what is not given, run, write ``downstream.json``
    (``downstream-{task}.json`` for the other tasks). Holds ``out``'s lock (``io.output_lock``):
    two runs would share its caches. ``task_config`` (``task_models.TaskModelConfig``) is the
    depth / instance / pose recipe; without it those take ``config``'s training fields.
    ``device``/``dtype``: where the decoders train and the backbone generates (the ordinary models
    train on the CPU).

    The generation (when ``synthetic`` is not given; the ablation benches vary these):
    ``n_synthetic`` samples, ``generation_steps`` denoising steps at ``guidance``, the decoders
    reading the features of denoising step ``capture_step`` (default the last), prompted by
    ``prompts``: "captions" (world val captions), "people" (world val captions that name a person),
    "templates" (class-name templates over the decoders' classes) or a prompt file or folder
    (``prompts.load_prompts``); default ``default_prompts(task)``. The decoders' labels are filtered
    by ``min_pixel_confidence`` and ``min_instance_score`` (as ``generate``'s). A setting
    away from its default names its own shard and synthetic folders and result file (e.g.
    ``downstream-semantic-n250.json``), so runs of several settings share ``out``: its decoders,
    real set and real-only model. ``decoder_seed``: the decoders' training seed (initialisation and
    batch order; ``seed`` draws the real set and the generation); away from 0 the decoders and the
    data they label get their own folders (``decoders-dseed1``). ``joint``: how the joint model
    uses both sets (``JOINT_RECIPES``; default ``default_joint``); away from the default the result
    file is named for it (``downstream-instance-joint-mixed.json``). ``models``: the ones to train
    (``run_downstream``); runs on other machines or cores that share ``cache_dir`` train the others."""
    from datasetdm.io import output_lock

    joint = joint or default_joint(zero_shot)
    prompts = prompts or default_prompts(task)
    if task not in DOWNSTREAM_TASKS:
        raise DatasetdmError(f"--task {task!r}: choose one of {', '.join(DOWNSTREAM_TASKS)}")
    joint_recipe(joint, task)  # checked before anything is built
    models = check_models(models)
    if task != "semantic" and labeler != "decoder":
        raise DatasetdmError(f"--labeler {labeler}: labels semantic masks only; --task {task} needs --labeler decoder")
    if long_tail and task != "semantic":
        raise DatasetdmError("--long-tail: measured on semantic segmentation (head / tail mIoU); use --task semantic")
    if long_tail and real is not None:
        raise DatasetdmError("--long-tail makes the real few-shot set itself; drop --real")
    if long_tail and str(prompts) != "captions":
        raise DatasetdmError("--long-tail prompts with the long-tail set's own captions; drop --prompts")
    if str(prompts) not in NAMED_PROMPTS and not Path(prompts).exists():
        raise DatasetdmError(f"--prompts {prompts}: no such prompt file or folder (or: {', '.join(NAMED_PROMPTS)})")
    if str(prompts) == "people" and class_quota is not None:
        raise DatasetdmError("--class-quota: the people prompts already plan every sample to name a person; "
                             "drop one of them")
    generation = _generation_settings(n_synthetic, generation_steps, guidance, capture_step, prompts,
                                      min_pixel_confidence, min_instance_score, default_prompts(task))
    if synthetic is not None and generation["tag"]:
        raise DatasetdmError("--synthetic is generated already: drop the generation settings "
                             f"({generation['tag'].lstrip('-')})")
    if min_instance_score is not None and task not in ("instance", "pose"):
        raise DatasetdmError(f"--min-instance-score: filters the instance or pose decoder's labels; --task is {task}")
    if not -generation_steps <= capture_step < generation_steps:
        raise DatasetdmError(f"--capture-step {capture_step}: out of range for {generation_steps} denoising steps")
    if domain is not None and (real is not None or long_tail):
        raise DatasetdmError("--domain makes the real few-shot set itself; drop --real and --long-tail")
    if zero_shot and (task != "semantic" or real is not None or long_tail or domain is not None
                      or labeler != "decoder"):
        raise DatasetdmError("--zero-shot: semantic segmentation with decoder labels on the world's own real set; "
                             "drop --task, --real, --long-tail, --domain and --labeler")
    if zero_shot:
        from datasetdm.world.render import CATEGORIES as WORLD

        names = {c.name for c in WORLD}
        unknown = [c for c in zero_shot if c not in names]
        if unknown:
            raise DatasetdmError(f"--zero-shot {','.join(unknown)}: not a world class ({', '.join(sorted(names))})")
    if semantic_head not in SEMANTIC_HEADS:
        raise DatasetdmError(f"--semantic-head {semantic_head!r}: {' or '.join(SEMANTIC_HEADS)}")
    if semantic_head != "masks" and (task != "semantic" or labeler != "decoder" or synthetic is not None or zero_shot):
        raise DatasetdmError("--semantic-head: the semantic decoder that labels the synthetic set generated here; "
                             "drop --task, --labeler, --synthetic and --zero-shot")
    if domain is not None:
        from datasetdm.world.folders import parse_domain

        parse_domain(domain)  # checked before anything is built
    with output_lock(out):
        return _build_and_run(
            out, test_seed=test_seed, n_test=n_test, real=real, synthetic=synthetic, n_synthetic=n_synthetic,
            labeler=labeler, backbone=backbone, config=config, decoder_iterations=decoder_iterations, seed=seed,
            cache_dir=cache_dir, min_pixel_confidence=min_pixel_confidence, task=task, task_config=task_config,
            class_quota=class_quota, long_tail=list(long_tail), head_images=head_images, tail_images=tail_images,
            device=device, dtype=dtype, domain=domain, zero_shot=list(zero_shot), generation=generation,
            semantic_head=semantic_head, decoder_seed=decoder_seed, joint=joint, models=models)


def plan_long_tail_quota(real: str | Path, class_quota: int, n_synthetic: int, seed: int = 0) -> dict:
    """The ``--class-quota`` plan of a long-tail run, whose prompts are its real set's captions: the
    planned samples per class, or the ``DatasetdmError`` generation would raise when ``n_synthetic``
    samples cannot meet the quota — found before hours of training, not after."""
    from datasetdm.generation.setup import prompt_source
    from datasetdm.world.render import CATEGORIES

    return prompt_source(Path(real), None, [c.name for c in CATEGORIES], n_synthetic, seed, class_quota).counts


# the world's prompt sources by name; any other --prompts value is a prompt file or folder
NAMED_PROMPTS = ("captions", "people", "templates")


def default_prompts(task: str) -> str:
    """The prompt source a run gets unless told: the world's captions, but for pose only those that name
    a person. The pose model learns from people alone, and about three world scenes in four show none;
    prompted for people, the same 1000 samples carry 938 labelled people instead of 259, and the
    fine-tuned joint model passes real-only (keypoint AP 0.701 against 0.601 on test seed 2, where it
    was chosen; session 27, `bench/joint_recipes.py --synthetic`)."""
    return "people" if task == "pose" else "captions"


def default_joint(zero_shot: Sequence[str] = ()) -> str:
    """The joint recipe a run gets unless told: "finetune", but "mixed" where the synthetic set is
    meant to carry classes the real set lacks: a model that ends on the real set alone unlearns them
    (zero-shot, test seed 1, session 23: unseen mIoU 0.000 fine-tuned against 0.323 mixed). Long-tail
    keeps finetune: its real set shows the rare classes too, if in 2 images, and only the fine-tuned
    joint model gains tail mIoU from the quotas (test seed 2, session 31: tail 0.232 -> 0.243, the
    mixed one's 0.252 -> 0.218; seed 1 alike). Domain shift keeps finetune too: there the real set
    has every class, and ending on it cost nothing (test seed 2, session 26: joint mIoU 0.292
    fine-tuned against 0.208 mixed, real-only 0.198)."""
    return "mixed" if zero_shot else JOINT_RECIPES[0]


# default of each generation setting, and how a run away from it is tagged in folder and file names
_GENERATION_DEFAULTS = {"n": 1000, "steps": GENERATION_STEPS, "guidance": GUIDANCE_SCALE, "capture_step": -1,
                        "prompts": "captions", "min_pixel_confidence": None, "min_instance_score": None}


def _generation_settings(n: int, steps: int, guidance: float, capture_step: int, prompts,
                         min_pixel_confidence: float | None = None, min_instance_score: float | None = None,
                         default_source: str = "captions") -> dict:
    """The synthetic set's generation settings and their tag: empty at the defaults (``default_source``:
    the task's prompt source), so the folders and results of runs made before these were settings keep
    their names."""
    source = str(prompts)
    settings = {"n": n, "steps": steps, "guidance": float(guidance), "capture_step": capture_step,
                "prompts": source, "min_pixel_confidence": min_pixel_confidence,
                "min_instance_score": min_instance_score}
    tag = ""
    for key, short in (("n", "n"), ("steps", "steps"), ("guidance", "g"), ("capture_step", "capture"),
                       ("min_pixel_confidence", "minconf"), ("min_instance_score", "minscore")):
        value = settings[key]
        if value is None:
            continue
        value = float(value) if key.startswith("min_") else value
        if value != _GENERATION_DEFAULTS[key]:
            tag += f"-{short}{value:g}" if isinstance(value, float) else f"-{short}{value}"
    if source != default_source:
        tag += "-prompts-" + (source if source in NAMED_PROMPTS else Path(source).stem)
    return {**settings, "tag": tag}


def _real_set(out: Path, real, seed: int, long_tail: list, head_images: int, tail_images: int,
              domain: str | None, zero_shot: list, say) -> tuple[Path, str]:
    """The real few-shot set: the caller's folder, or world scenes rendered into ``out`` (100, or a
    long-tail, single-domain or seen-classes-only set), and the tag naming what differs from the
    default set in the folders built on it."""
    from datasetdm.world.folders import (
        parse_domain,
        render_domain_folder,
        render_long_tail_folder,
        render_seen_only_folder,
        render_world_folder,
    )

    tag = ""
    if long_tail:
        tag = f"-lt-{'_'.join(long_tail)}-{head_images}-{tail_images}"
        say(f"downstream: long-tail real set (tail {', '.join(long_tail)}: {tail_images} images each; "
            f"head classes {head_images})")
        real = render_long_tail_folder(out / f"real{tag}", "train", seed, long_tail, head_images, tail_images)
    if domain is not None:
        setting, lighting = parse_domain(domain)
        tag = f"-domain-{setting or 'any'}-{lighting or 'any'}"
        say(f"downstream: real set from {setting or 'any setting'} / {lighting or 'any lighting'} only; "
            "tested on the other settings and lightings")
        real = render_domain_folder(out / f"real{tag}", "train", seed, 100, setting, lighting)
    if zero_shot:
        tag = f"-zs-{'_'.join(zero_shot)}"
        say(f"downstream: zero-shot, unseen {', '.join(zero_shot)} (labels removed from the real set)")
        real = render_seen_only_folder(out / f"real{tag}", "train", seed, 100, zero_shot)
    return (Path(real) if real else render_world_folder(out / "real", "train", seed, 100)), tag


def _synthetic_set(out: Path, real: Path, tag: str, run_tag: str, *, task: str, labeler: str, backbone,
                   generation: dict, n_synthetic: int, seed: int, long_tail: list, zero_shot: list,
                   decoder_iterations, semantic_head: str, decoder_seed: int, min_pixel_confidence,
                   class_quota, placement: dict, say) -> tuple[Path, Path]:
    """Stages 2-5 on the real set: train the task's decoder (few-shot), generate ``n_synthetic``
    labelled samples with it (or with the training-free attention labeler), export them to a
    labelled folder. Returns (labelled folder, shards)."""
    from datasetdm.backbone.loader import embedded_backbone_path
    from datasetdm.formats.export import export_shards
    from datasetdm.generation.defaults import GENERATION_BATCH
    from datasetdm.generation.setup import generate_labelled
    from datasetdm.training import train_decoders
    from datasetdm.world.folders import world_prompt_file
    from datasetdm.world.render import CATEGORIES

    source = backbone or str(embedded_backbone_path())
    quota_classes = None  # the quota plan's classes: every class unless the prompts say otherwise
    # long-tail: prompts are the real set's captions, so they share its imbalance (unless quotas)
    if long_tail:
        prompts = real
    elif generation["prompts"] == "captions":  # as many captions as samples: one file per size
        n_tag = f"-n{n_synthetic}" if n_synthetic != _GENERATION_DEFAULTS["n"] else ""
        prompts = world_prompt_file(out / f"prompts{n_tag}.txt", n_synthetic, seed)
    elif generation["prompts"] == "people":
        # the world shows a person in about one scene in four: a pool of 4 n captions holds about n that
        # name one, and the quota plan draws every sample's prompt from those (prompts.quota)
        pool = max(4 * n_synthetic, 400)
        prompts = world_prompt_file(out / f"prompts-n{pool}.txt", pool, seed)
        quota_classes, class_quota = ["person"], n_synthetic
    elif generation["prompts"] == "templates":
        prompts = None  # generate_labelled's templates over the decoders' classes
    else:
        prompts = Path(generation["prompts"])
    kind = labeler if task == "semantic" else f"{labeler}-{task}"
    shards = out / f"shards-{kind}{run_tag}"
    decoders = []
    if labeler == "decoder":
        # zero-shot: an open-vocabulary decoder that never saw the unseen classes' labels or names
        decoders = list(train_decoders(real, out / f"decoders{tag}", ["open-vocab" if zero_shot else task], source,
                                       decoder_iterations, log=say, semantic_head=semantic_head,
                                       seed=decoder_seed, held_out=zero_shot or (), **placement).values())
    generate_labelled(shards, labeler=labeler, backbone=source, decoders=decoders,
                      categories=list(CATEGORIES) if labeler == "attention" else (), prompts=prompts,
                      n=n_synthetic, seed=seed, steps=generation["steps"], guidance=generation["guidance"],
                      batch_size=GENERATION_BATCH, min_pixel_confidence=min_pixel_confidence,
                      classes=quota_classes, class_quota=class_quota, capture_step=generation["capture_step"],
                      min_instance_score=generation["min_instance_score"], **placement)
    synthetic = out / f"synthetic-{kind}{run_tag}"
    export_shards(shards, synthetic, overwrite=True)
    return synthetic, shards


def _train_and_score(task: str, real: Path, synthetic: Path, test_seed: int, n_test: int, domain: str | None,
                     config, task_config, cache: Path, joint: str,
                     models: Sequence[str] = DOWNSTREAM_MODELS) -> tuple[dict, list[Category]]:
    """Stage 7: the three ordinary models (real, synthetic, joint) of ``task``, scored on world test
    scenes (for ``domain``: the scenes outside it), with a progress bar per model."""
    from datasetdm.progress import progress_bar
    from datasetdm.world.folders import domain_scenes, parse_domain
    from datasetdm.world.render import CATEGORIES

    categories = list(CATEGORIES)
    with progress_bar(transient=True) as bar:
        tasks = {}

        def report(name, step, total):
            if name not in tasks:
                tasks[name] = bar.add_task(f"{task} model on {name}", total=total)
            bar.update(tasks[name], completed=step)

        test_samples = None
        if domain is not None:  # the target domains: every test scene outside the source domain
            setting, lighting = parse_domain(domain)
            test_samples = domain_scenes("test", test_seed, n_test, setting, lighting, inside=False)
        if task == "semantic":
            if test_samples is None:
                test_images, test_masks, categories = world_test_set(test_seed, n_test)
            else:
                test_images = np.stack([s.image for s in test_samples])
                test_masks = np.stack([s.semantic for s in test_samples])
            result = run_downstream(real, synthetic, test_images, test_masks, categories, config, progress=report,
                                    cache_dir=cache, joint=joint, models=models)
        else:
            from datasetdm.evaluation.task_models import TaskModelConfig

            if task_config is None:
                task_config = TaskModelConfig(**asdict(config or DownstreamConfig()))
            if test_samples is None:
                test_samples = world_test_samples(test_seed, n_test)
            result = run_task_downstream(task, real, synthetic, test_samples, categories, task_config,
                                         progress=report, cache_dir=cache, joint=joint, models=models)
    return result, categories


def _build_and_run(out, *, test_seed, n_test, real, synthetic, n_synthetic, labeler, backbone, config,
                   decoder_iterations, seed, cache_dir, min_pixel_confidence, task, task_config, class_quota,
                   long_tail, head_images, tail_images, device, dtype, domain, zero_shot, generation,
                   semantic_head="masks", decoder_seed=0, joint="finetune", models=DOWNSTREAM_MODELS) -> dict:
    from rich.console import Console

    from datasetdm.labelers.registry import LABELERS
    from datasetdm.world.folders import parse_domain

    say = Console(stderr=True).print
    # an explicit placement is passed on; the default leaves the callees their own ("auto")
    placement = {} if device == "auto" and dtype is None else {"device": device, "dtype": dtype}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if labeler not in LABELERS:
        raise DatasetdmError(f"--labeler {labeler!r}: choose one of {', '.join(LABELERS)}")
    real, tag = _real_set(out, real, seed, long_tail, head_images, tail_images, domain, zero_shot, say)
    if long_tail and class_quota and synthetic is None:
        plan_long_tail_quota(real, class_quota, n_synthetic, seed)  # refused now, not after the decoder trains
    if semantic_head != "masks":  # other decoders, on the same real set
        tag += f"-{semantic_head}"
    if decoder_seed:
        tag += f"-dseed{decoder_seed}"
    run_tag = tag + (f"-quota{class_quota}" if class_quota else "") + generation["tag"]
    generated = synthetic is None
    if generated:
        synthetic, shards = _synthetic_set(
            out, real, tag, run_tag, task=task, labeler=labeler, backbone=backbone, generation=generation,
            n_synthetic=n_synthetic, seed=seed, long_tail=long_tail, zero_shot=zero_shot,
            decoder_iterations=decoder_iterations, semantic_head=semantic_head, decoder_seed=decoder_seed,
            min_pixel_confidence=min_pixel_confidence, class_quota=class_quota, placement=placement, say=say)
    say(f"downstream ({task}): real {real}, synthetic {synthetic}, {n_test} test scenes (seed {test_seed})")
    cache = cache_dir if cache_dir is not None else out / "cache"
    result, categories = _train_and_score(task, real, synthetic, test_seed, n_test, domain, config, task_config,
                                          cache, joint, models)
    result.update({"test_seed": test_seed, "labeler": labeler, "real": str(real), "synthetic": str(synthetic)})
    headline: dict = {"task": task}
    if task == "semantic":
        table = format_table(result, categories)
        headline.update({k: None if result[k] is None else round(result[k], 4)
                         for k in ("real_miou", "synthetic_miou", "joint_miou")})
    else:
        table = format_task_table(result)
        keys = [f"{name}_{m}" for name in ("real", "synthetic", "joint") for m in TASK_METRICS[task]]
        headline.update({k: None if result[k] is None else round(result[k], 4) for k in keys})
    if long_tail:
        result["tail_classes"] = long_tail
        result["class_quota"] = class_quota
        result.update(head_tail_miou(result["per_class"], categories, long_tail))
        result["synthetic_class_images"] = _class_images(synthetic, categories)
        headline.update({k: None if result[k] is None else round(result[k], 4)
                         for k in result if k.endswith(("_head_miou", "_tail_miou"))})
        headline.update({"tail_classes": long_tail, "class_quota": class_quota})
        table += "\n" + format_head_tail(result)
    if zero_shot:
        result["unseen_classes"] = zero_shot
        result.update(seen_unseen_miou(result["per_class"], categories, zero_shot))
        headline.update({k: None if result[k] is None else round(result[k], 4)
                         for k in result if k.endswith(("_seen_miou", "_unseen_miou", "_harmonic_miou"))})
        headline["unseen_classes"] = zero_shot
        table += "\n" + format_seen_unseen(result)
    if domain is not None:
        setting, lighting = parse_domain(domain)
        result["domain"] = {"setting": setting, "lighting": lighting, "test": "outside"}
        headline["domain"] = domain
    if generated:
        result["generation"] = {**{k: v for k, v in generation.items() if k != "tag"}, "shards": str(shards)}
    if semantic_head != "masks":
        result["semantic_head"] = headline["semantic_head"] = semantic_head
    if decoder_seed:
        result["decoder_seed"] = headline["decoder_seed"] = decoder_seed
    if decoder_iterations is not None and generated and labeler == "decoder":
        result["decoder_iterations"] = headline["decoder_iterations"] = decoder_iterations
    headline["joint"] = joint
    default = default_joint(zero_shot)
    result_tag = run_tag + ("" if joint == default else f"-joint-{joint.replace(':', '-')}")
    default_name = task == "semantic" and not result_tag
    saved = out / ("downstream.json" if default_name else f"downstream-{task}{result_tag}.json")
    write_json_atomic(saved, result)
    headline.update({"n_real": result["n_real"], "n_synthetic": result["n_synthetic"], "n_test": n_test,
                     "test_seed": test_seed, "labeler": labeler, "result_file": str(saved)})
    return {"table": table, **headline}


def seen_unseen_miou(per_class: dict, categories: list[Category], unseen: list[str]) -> dict:
    """Seen, unseen and harmonic mIoU per model (Table 7's zero-shot columns; background counts for
    neither); harmonic = 2 seen unseen / (seen + unseen)."""
    unseen_ids = {c.id for c in categories if c.name in unseen}
    out = {}
    for model, ious in per_class.items():
        seen = [v for k, v in ious.items() if k != 0 and k not in unseen_ids]
        new = [v for k, v in ious.items() if k in unseen_ids]
        s = float(np.mean(seen)) if seen else None
        u = float(np.mean(new)) if new else None
        out[f"{model}_seen_miou"], out[f"{model}_unseen_miou"] = s, u
        out[f"{model}_harmonic_miou"] = None if s is None or u is None else (2 * s * u / (s + u) if s + u > 0 else 0.0)
    return out


def format_seen_unseen(result: dict) -> str:
    rows = [f"{'training data':<22}{'seen':>9}{'unseen':>9}{'harmonic':>10}"]
    for key, label in (("real", "real"), ("synthetic", "synthetic only"), ("joint", "real + synthetic")):
        cells = "".join(f"{'-':>{w}}" if result.get(f"{key}_{p}_miou") is None else f"{result[f'{key}_{p}_miou']:>{w}.4f}"
                        for p, w in (("seen", 9), ("unseen", 9), ("harmonic", 10)))
        rows.append(f"{label:<22}{cells}")
    return "\n".join(rows)


def _class_images(folder, categories: list[Category]) -> dict[str, int]:
    """Images of a labelled folder whose semantic masks show each class (by name)."""
    data = read_labelled_folder(folder)
    names = {c.id: c.name for c in data.categories}
    counts = {c.name: 0 for c in categories}
    for sample in data:
        if sample.semantic is None:
            continue
        for v in np.unique(sample.semantic):
            name = names.get(int(v))
            if name in counts:
                counts[name] += 1
    return counts


def format_head_tail(result: dict) -> str:
    """Head / tail mIoU per model (Table 7's long-tail columns)."""
    rows = [f"{'training data':<22}{'head mIoU':>11}{'tail mIoU':>11}"]
    for key, label in (("real", "real"), ("synthetic", "synthetic only"), ("joint", "real + synthetic")):
        cells = "".join(f"{'-':>11}" if result.get(f"{key}_{p}_miou") is None else f"{result[f'{key}_{p}_miou']:>11.4f}"
                        for p in ("head", "tail"))
        rows.append(f"{label:<22}{cells}")
    return "\n".join(rows)
