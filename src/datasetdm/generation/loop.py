"""The text-to-data loop (paper §3.5, Fig. 2b): prompts in, annotated shards out.

For sample ids 0..n-1, in order: the prompt source picks the prompt for the id, the sample's
seed is ``sample_seed(seed, id)``, batches of prompts are generated once (image + captured
hypercolumns), and every annotator labels each image from those same hypercolumns. Scores are
computed per sample, filters drop bad ones (recorded in the manifest with the reason), and the
rest go into WebDataset shards.

Prompts longer than the text encoder's window (77 tokens) are cut by the model: a warning says
so, and a class named only past the cut is dropped from that sample's labels (its pixels become
ignore, 255; its instances go) and from its agreement score, since the model never read it.

Nothing depends on the batch size: prompts and seeds come from the sample id, and the backbone
draws each sample's noise from its own seed. Shards are written atomically and ``resume=True``
continues an interrupted run with exactly the samples an uninterrupted run would write.

Plug-in points, so decoders and training-free labelers share the loop:

* ``generate_fn(prompts: list[str], seeds: list[int]) -> (images, Hypercolumns)``; images are
  (B, H, W, 3) uint8, or floats in [0, 1] ((B, H, W, 3) array or (B, 3, H, W) tensor).
* annotators, ``{name: fn}`` with ``fn(images, hypercolumns, prompts) -> list[LabelledSample]``
  (one per image; only the label fields are read: ``semantic``, ``instances``, ``depth``, and
  ``meta["confidence"]``, a float in [0, 1], when the annotator has a confidence but no
  instance scores). ``images`` is (B, H, W, 3) uint8, ``prompts`` a list of ``Prompt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import IGNORE_INDEX, Category, LabelledSample
from datasetdm.formats.shards import ShardWriter, encode_kept, read_manifest
from datasetdm.io import output_lock, sample_seed
from datasetdm.progress import progress_bar, rate_column
from datasetdm.prompts.base import Prompt, PromptSource, classes_in_text

GenerateFn = Callable[[list[str], list[int]], tuple]
Annotator = Callable[[np.ndarray, object, list[Prompt]], list[LabelledSample]]
LABEL_FIELDS = ("semantic", "instances", "depth")
# ``read_prompt(text)`` -> what the model reads of it (``backbone.tokens.PromptFit``: .text,
# .tokens, .limit, .truncated); the labeler knows the exact text it generates from
ReadPrompt = Callable[[str], object]
log = logging.getLogger("datasetdm")


# --------------------------------------------------------------------------------------------
# Quality scores and filters
# --------------------------------------------------------------------------------------------


@dataclass
class Filters:
    """Drop a sample when a score is below (or, for ``max_ignore``, above) its threshold.

    A threshold of None is off. A score that could not be computed (e.g. no semantic mask) never
    drops a sample.
    """

    min_confidence: float | None = None  # mean annotator confidence
    min_area: float | None = None  # labelled foreground fraction of the image
    min_agreement: float | None = None  # fraction of the prompt's classes found in the labels
    max_ignore: float | None = None  # fraction of ignore (255) pixels

    def reason(self, scores: Mapping[str, float | None]) -> str | None:
        """Why the sample is dropped, or None to keep it."""
        for name, limit, below in (
            ("confidence", self.min_confidence, True),
            ("area", self.min_area, True),
            ("agreement", self.min_agreement, True),
            ("ignore", self.max_ignore, False),
        ):
            value = scores.get(name)
            if limit is None or value is None:
                continue
            if below and value < limit:
                return f"{name} {value:.3f} < {limit:g}"
            if not below and value > limit:
                return f"{name} {value:.3f} > {limit:g}"
        return None


def quality_scores(
    sample: LabelledSample,
    prompt: Prompt,
    categories: Sequence[Category],
    confidences: Sequence[float] = (),
    min_class_fraction: float = 0.001,
) -> dict[str, float | None]:
    """Per-sample scores: ``confidence``, ``area``, ``ignore`` and ``agreement`` (None if unknown).

    Agreement is recall of the prompt's classes: a prompt "a dog on a street" may rightly show a
    road too, so extra classes are not penalised; a missing dog is. A class counts as present
    when it covers at least ``min_class_fraction`` of the image (or has an instance).
    """
    h, w = sample.size
    names = {c.id: c.name for c in categories}
    present: set[str] = set()
    area = ignore = None
    if sample.semantic is not None:
        sem = np.asarray(sample.semantic)
        ids, counts = np.unique(sem, return_counts=True)
        fractions = dict(zip(ids.tolist(), (counts / sem.size).tolist()))
        ignore = fractions.get(IGNORE_INDEX, 0.0)
        area = float(((sem != 0) & (sem != IGNORE_INDEX)).mean())
        present |= {names[i] for i, f in fractions.items() if i in names and f >= min_class_fraction}
    if sample.instances is not None:
        union = np.zeros((h, w), bool)
        for inst in sample.instances:
            union |= np.asarray(inst.mask, bool)
            if inst.category_id in names and inst.mask.mean() >= min_class_fraction:
                present.add(names[inst.category_id])
        if area is None:
            area = float(union.mean())
    agreement = None
    labelled = sample.semantic is not None or sample.instances is not None
    if prompt.classes and labelled:
        agreement = sum(c in present for c in prompt.classes) / len(prompt.classes)
    confidence = float(np.mean(confidences)) if len(confidences) else None
    return {"confidence": confidence, "area": area, "ignore": ignore, "agreement": agreement}


# --------------------------------------------------------------------------------------------
# Annotation
# --------------------------------------------------------------------------------------------


def as_uint8_images(images) -> np.ndarray:
    """(B, H, W, 3) uint8 from what a generate function returns (see the module doc)."""
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetdmError(f"generate function returned images of shape {images.shape}; expected (B, H, W, 3)")
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return images


def _confidence(label: LabelledSample) -> float | None:
    scores = [i.score for i in label.instances or [] if i.score is not None]
    if scores:
        return float(np.mean(scores))
    value = (label.meta or {}).get("confidence")
    return None if value is None else float(value)


def _check_label(name: str, label, shape: tuple[int, int], category_ids: set[int]) -> None:
    where = f"annotator {name!r}"
    if not all(hasattr(label, f) for f in LABEL_FIELDS):
        raise DatasetdmError(f"{where}: returned {type(label).__name__}; expected LabelledSample-like outputs")
    if label.semantic is not None:
        sem = np.asarray(label.semantic)
        if sem.shape != shape:
            raise DatasetdmError(f"{where}: semantic mask is {sem.shape}, image is {shape}")
        unknown = set(np.unique(sem).tolist()) - category_ids - {0, IGNORE_INDEX}
        if unknown:
            raise DatasetdmError(f"{where}: semantic mask has category ids {sorted(unknown)} not in the run's categories")
    if label.depth is not None and np.shape(label.depth) != shape:
        raise DatasetdmError(f"{where}: depth is {np.shape(label.depth)}, image is {shape}")
    for inst in label.instances or []:
        if inst.category_id not in category_ids:
            raise DatasetdmError(f"{where}: instance of unknown category id {inst.category_id}")
        if np.shape(inst.mask) != shape:
            raise DatasetdmError(f"{where}: instance mask is {np.shape(inst.mask)}, image is {shape}")


def merge_labels(image: np.ndarray, labels: Mapping[str, LabelledSample]) -> tuple[LabelledSample, dict, dict[str, str]]:
    """One sample from several annotators' outputs for the same image.

    Each label field comes from the first annotator (in the given order) that provides it; a
    later annotator's field of a kind already taken is kept as an extra under its name, so two
    labelers of the same task can be compared on the same images. Keypoints are the exception
    that a dataset must not lose: a later annotator's people (a pose decoder after an instance
    decoder) lend their keypoints to the matching instance (same category, mask IoU ≥ 0.5), and
    people no instance matches are added with theirs.
    Returns (sample, extras by annotator name, annotator by field).
    """
    sample = LabelledSample(id="", image=image)
    extras: dict[str, LabelledSample] = {}
    source: dict[str, str] = {}
    for name, label in labels.items():
        for f in LABEL_FIELDS:
            value = getattr(label, f)
            if value is None:
                continue
            if f not in source:
                setattr(sample, f, value)
                source[f] = name
            else:
                extras.setdefault(name, LabelledSample(id="", image=image))
                setattr(extras[name], f, value)
                if f == "instances":
                    sample.instances = _merge_keypoints(sample.instances, value)
    return sample, extras, source


def _merge_keypoints(instances: list, people: list) -> list:
    with_keypoints = [p for p in people if p.keypoints is not None]
    if not with_keypoints:
        return instances
    merged = [dataclasses.replace(i) for i in instances]
    for person in with_keypoints:
        best, best_iou = None, 0.5
        for inst in merged:
            if inst.category_id != person.category_id or inst.keypoints is not None:
                continue
            inter = np.logical_and(inst.mask, person.mask).sum()
            union = np.logical_or(inst.mask, person.mask).sum()
            iou = inter / union if union else 0.0
            if iou >= best_iou:
                best, best_iou = inst, iou
        if best is not None:
            best.keypoints = person.keypoints
        else:
            merged.append(person)
    return merged


def classes_past_limit(prompt: Prompt, fit, names: Sequence[str]) -> list[str]:
    """The classes ``prompt`` names only in the words the model did not read (``fit``: what
    ``read_prompt`` says the model read of it)."""
    if fit is None or not fit.truncated:
        return []
    read = set(classes_in_text(fit.text, names))
    return [c for c in classes_in_text(prompt.text, names) if c not in read]


def drop_classes(label: LabelledSample, category_ids: set[int]) -> None:
    """Remove classes from a sample's labels: their pixels become ignore (255: unknown, not
    background, since the image may show something there), their instances go."""
    if not category_ids:
        return
    if label.semantic is not None:
        semantic = np.array(label.semantic, copy=True)
        semantic[np.isin(semantic, sorted(category_ids))] = IGNORE_INDEX
        label.semantic = semantic
    if label.instances is not None:
        label.instances = [i for i in label.instances if i.category_id not in category_ids]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationSummary:
    out: Path
    n: int
    generated: int  # sample ids generated by this call (less than n after a resume)
    kept: int  # in the whole run
    dropped: int
    drop_reasons: dict[str, int] = field(default_factory=dict)  # by score name
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def prompts_fingerprint(prompts: PromptSource, count: int = 64) -> str:
    """A hash of the first prompts, so resuming with another prompt source is caught."""
    digest = hashlib.sha256()
    for i in range(count):
        p = prompts.prompt(i)
        digest.update(json.dumps([p.text, list(p.classes)]).encode())
    return digest.hexdigest()[:16]


@dataclass
class LabelledRow:
    """One sample id's outcome: its manifest row, its shard files (None when a filter dropped
    it) and, when its prompt runs past the token limit, the warning to log."""

    id: int
    row: dict
    files: dict[str, bytes] | None
    warning: str | None = None


class BatchLabeler:
    """Labels a batch of sample ids: one generate call, every annotator on its hypercolumns, then
    per sample the merged labels, scores, the filters' verdict and the encoded shard files. The
    single process and every scale-out worker run this same object, so they write the same bytes."""

    def __init__(self, generate_fn: GenerateFn, annotators: Mapping[str, Annotator], categories: Sequence[Category],
                 seed: int, filters: Filters | None = None, read_prompt: ReadPrompt | None = None):
        if not annotators:
            raise DatasetdmError("generation needs at least one annotator (a decoder or a labeler)")
        self.generate_fn, self.annotators = generate_fn, dict(annotators)
        self.categories = list(categories)
        self.seed, self.filters, self.read_prompt = seed, filters or Filters(), read_prompt
        self._category_ids = {c.id for c in self.categories}
        self._names = [c.name for c in self.categories]
        self._id_of = {c.name: c.id for c in self.categories}

    def __call__(self, ids: Sequence[int], batch_prompts: Sequence[Prompt]) -> list[LabelledRow]:
        ids, batch_prompts = list(ids), list(batch_prompts)
        seeds = [sample_seed(self.seed, i) for i in ids]
        images, hypercolumns = self.generate_fn([p.text for p in batch_prompts], seeds)
        images = as_uint8_images(images)
        if len(images) != len(ids):
            raise DatasetdmError(f"generate function returned {len(images)} images for {len(ids)} prompts")
        outputs = {}
        for name, annotate in self.annotators.items():
            labels = list(annotate(images, hypercolumns, batch_prompts))
            if len(labels) != len(ids):
                raise DatasetdmError(f"annotator {name!r}: returned {len(labels)} outputs for {len(ids)} images")
            for label in labels:
                _check_label(name, label, images.shape[1:3], self._category_ids)
            outputs[name] = labels
        return [self._one(sample_id, images[b], {name: outputs[name][b] for name in self.annotators},
                          batch_prompts[b], seeds[b]) for b, sample_id in enumerate(ids)]

    def _one(self, sample_id: int, image, labels: dict, prompt: Prompt, seed: int) -> LabelledRow:
        sample, extras, source = merge_labels(image, labels)
        sample.id = str(sample_id)
        sample.caption = prompt.text
        fit = self.read_prompt(prompt.text) if self.read_prompt is not None else None
        unread = classes_past_limit(prompt, fit, self._names)
        warning = None
        if fit is not None and fit.truncated:
            dropped = f"; {', '.join(unread)} named only past it: dropped from its labels" if unread else ""
            warning = (f"warning: the prompt of sample {sample_id} is {fit.tokens} tokens; the model reads "
                       f"the first {fit.limit}{dropped} ({prompt.text[:60]!r}...)")
        for label in (sample, *extras.values()):
            drop_classes(label, {self._id_of[c] for c in unread})
        scored = dataclasses.replace(prompt, classes=tuple(c for c in prompt.classes if c not in unread))
        confidences = [c for c in map(_confidence, labels.values()) if c is not None]
        scores = quality_scores(sample, scored, self.categories, confidences)
        reason = self.filters.reason(scores)
        row = {"prompt": prompt.text, "classes": list(prompt.classes), "seed": seed, "scores": scores,
               "annotators": source}
        if unread:
            row["unread_classes"] = unread  # in the sample's JSON: named past the token limit
        if reason is not None:
            row["dropped_reason"] = reason
            return LabelledRow(sample_id, row, None, warning)
        return LabelledRow(sample_id, row, encode_kept(sample_id, row, sample, self.categories, extras or None), warning)


def batch_plan(start: int, n: int, batch_size: int, samples_per_shard: int) -> list[list[int]]:
    """The batches of sample ids from ``start`` to ``n``. Batches never span a shard boundary: a
    resumed run (which restarts at a boundary) then forms exactly the batches an uninterrupted run
    formed, so even a backbone whose float results vary slightly with batch composition gives
    identical samples; scale-out workers get these same batches."""
    batches, first = [], start
    while first < n:
        shard_end = (first // samples_per_shard + 1) * samples_per_shard
        batches.append(list(range(first, min(first + batch_size, n, shard_end))))
        first = batches[-1][-1] + 1
    return batches


# ``executor(batches, labeler_settings)``: LabelledRows of every batch's ids, in sample-id order
# (the driver writes them as they come). None runs the batches in this process.
Executor = Callable[[list[tuple[list[int], list[Prompt]]], dict], Iterator[LabelledRow]]


def generate_dataset(
    out: str | Path,
    generate_fn: GenerateFn,
    annotators: Mapping[str, Annotator],
    prompts: PromptSource,
    categories: Sequence[Category],
    n: int,
    seed: int = 0,
    batch_size: int = 8,
    samples_per_shard: int = 1000,
    filters: Filters | None = None,
    backbone: str = "",
    config: Mapping | None = None,
    resume: bool = False,
    progress: bool = True,
    read_prompt: ReadPrompt | None = None,
    executor: Executor | None = None,
) -> GenerationSummary:
    """Generate sample ids 0..n-1 into shards under ``out`` (see the module doc).

    ``config`` adds run settings that must match on resume (image size, steps, guidance,
    decoder checkpoints); seed, prompts, annotators and filters are always checked.
    ``read_prompt`` (from the labeler) says what the model reads of a prompt; without it no
    token-limit check is made. ``executor`` labels the batches elsewhere (``generation.scaleout``:
    Ray workers, each with its own copy of the labeler); this process then only writes.
    Holds ``out``'s lock (``io.output_lock``) while it runs.
    """
    with output_lock(out):
        return _generate(out, generate_fn, annotators, prompts, categories, n, seed, batch_size, samples_per_shard,
                         filters, backbone, config, resume, progress, read_prompt, executor)


def _in_process(labeler: BatchLabeler) -> Executor:
    def run(batches, settings) -> Iterator[LabelledRow]:
        for ids, batch_prompts in batches:
            yield from labeler(ids, batch_prompts)

    return run


def _generate(out, generate_fn, annotators, prompts, categories, n, seed, batch_size, samples_per_shard, filters,
              backbone, config, resume, progress, read_prompt, executor) -> GenerationSummary:
    if n < 0:
        raise DatasetdmError(f"--n must be >= 0, got {n}")
    if batch_size < 1:
        raise DatasetdmError(f"--batch-size must be >= 1, got {batch_size}")
    filters = filters or Filters()
    categories = list(categories)
    labeler = BatchLabeler(generate_fn, annotators, categories, seed, filters, read_prompt)
    run_config = {
        "seed": seed,
        "prompts": prompts_fingerprint(prompts),
        "annotators": list(annotators),
        "filters": asdict(filters),
        **(config or {}),
    }
    writer = ShardWriter(out, categories, run_config, samples_per_shard, backbone=backbone, resume=resume)
    start = writer.resume_from(n)
    batches = [(ids, [prompts.prompt(i) for i in ids]) for ids in batch_plan(start, n, batch_size, samples_per_shard)]
    warned: set[str] = set()
    t0 = time.perf_counter()
    with progress_bar(rate_column("samples"), "kept {task.fields[kept]}", enabled=progress) as bar, writer:
        task = bar.add_task("generating", total=n, completed=min(start, n), kept="")
        kept = 0
        results = (executor or _in_process(labeler))(batches, {"seed": seed, "filters": filters})
        try:
            for item in results:
                if item.warning is not None and item.row["prompt"] not in warned:
                    warned.add(item.row["prompt"])
                    log.warning(item.warning)
                writer.add_files(item.id, item.row, item.files)
                kept += item.files is not None
                bar.update(task, advance=1, kept=kept)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # a generator's finally runs now: scale-out workers stop with the run
    seconds = time.perf_counter() - t0
    rows = read_manifest(out).to_pylist() if n > 0 else []
    reasons = Counter(r["dropped_reason"].split(" ")[0] for r in rows if not r["kept"])
    return GenerationSummary(
        out=Path(out),
        n=n,
        generated=max(n - start, 0),
        kept=sum(r["kept"] for r in rows),
        dropped=sum(not r["kept"] for r in rows),
        drop_reasons=dict(reasons),
        seconds=seconds,
    )
