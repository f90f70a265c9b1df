"""What every importer and exporter shares: the scanned data set, the staged output folder, the
label-PNG readers with errors that name the file, and the rule that paints instances into one map.

An importer *scans* the data set as it ships (lists, file pairs, JSON) and returns a
``ScannedDataset``: its categories and one ``SourceItem`` per image, each loading its
``LabelledSample`` only when asked. Selection (few-shot) works on the items, so only the chosen
images are decoded.

Outputs are *staged*: everything is written to a hidden sibling folder first and moved into place
only when complete, so a failure (a corrupt file halfway through) leaves no half-written output,
and the output folder's lock is held meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.png import load_pixels
from datasetdm.formats.sample import Category, Instance, LabelledSample
from datasetdm.io import new_staging_folder, output_lock

IMPORT_RECORD = "import.json"
"""Written into every imported folder: the format, source and options (what ``train --format``
compares to reuse an import)."""


@dataclass
class SourceItem:
    """One image of a data set as it ships; ``load`` decodes it, ``class_ids`` lists the category
    ids it shows (cheap where the format allows: JSON for COCO, the label PNG otherwise)."""

    id: str
    load: Callable[[], LabelledSample]
    class_ids: Callable[[], frozenset[int]] | None = None  # None: the data set has no classes


@dataclass
class ScannedDataset:
    format: str
    root: Path
    categories: list[Category]
    items: list[SourceItem]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading label files
# --------------------------------------------------------------------------------------------


def read_index_png(path: Path, what: str) -> np.ndarray:
    """An 8-bit label PNG ('P' palette indices or 'L' grey values) as (H, W) uint8, never
    through a colour conversion: VOC's palette PNGs store the class id as the palette index."""
    image = load_pixels(path)
    if image.mode not in ("P", "L"):
        raise DatasetdmError(f"{path}: {what} must be an 8-bit palette or greyscale PNG, got mode {image.mode!r}")
    return np.asarray(image, dtype=np.uint8)


def read_wide_png(path: Path, what: str) -> np.ndarray:
    """A 16- or 32-bit greyscale PNG (Cityscapes instanceIds) as (H, W) int64."""
    image = load_pixels(path)
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "L"):
        raise DatasetdmError(f"{path}: {what} must be a 16-bit greyscale PNG, got mode {image.mode!r}")
    return np.asarray(image).astype(np.int64)


def check_size(path: Path, array: np.ndarray, image_path: Path, image: np.ndarray) -> None:
    if array.shape[:2] != image.shape[:2]:
        raise DatasetdmError(
            f"{path}: is {array.shape[1]}x{array.shape[0]} but its image {image_path.name} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )


def check_label_ids(path: Path, labels: np.ndarray, allowed: set[int], convention: str) -> None:
    unknown = sorted(set(np.unique(labels).tolist()) - allowed)
    if unknown:
        raise DatasetdmError(f"{path}: unknown label id(s) {unknown[:10]} ({convention})")


def load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetdmError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetdmError(f"{path}: not valid JSON ({e})") from None


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetdmError(f"{path}: missing ({what})")
    return path


def read_categories_json(path: Path) -> list[Category]:
    """``[{"id", "name"}]``, the file our exporters add when a layout cannot name its classes."""
    raw = load_json(path)
    if not isinstance(raw, list):
        raise DatasetdmError(f"{path}: expected a list of {{\"id\", \"name\"}} objects")
    try:
        categories = [Category(int(c["id"]), str(c["name"])) for c in raw]
    except (TypeError, KeyError, ValueError):
        raise DatasetdmError(f"{path}: every entry needs an integer 'id' and a 'name'") from None
    if any(not 1 <= c.id <= 254 for c in categories):
        raise DatasetdmError(f"{path}: category ids must lie in 1..254 (0 is background, 255 ignore)")
    return categories


# --------------------------------------------------------------------------------------------
# Painting instances
# --------------------------------------------------------------------------------------------


def paint_order(instances: Sequence[Instance]) -> list[int]:
    """The overlap rule of every layout that stores instances in one map (COCO semantic masks made
    from instances, VOC SegmentationObject, Cityscapes instanceIds): larger instances are painted
    first, so where two overlap the smaller one stays visible; equal areas keep list order."""
    areas = [int(np.count_nonzero(inst.mask)) for inst in instances]
    return sorted(range(len(instances)), key=lambda k: (-areas[k], k))


def paint_instance_ids(instances: Sequence[Instance], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int64 map: 0 where no instance, k + 1 where instance k is on top (``paint_order``)."""
    index = np.zeros(shape, dtype=np.int64)
    for k in paint_order(instances):
        index[np.asarray(instances[k].mask, dtype=bool)] = k + 1
    return index


def semantic_from_instances(instances: Sequence[Instance], shape: tuple[int, int]) -> np.ndarray:
    semantic = np.zeros(shape, dtype=np.uint8)
    for k in paint_order(instances):
        semantic[np.asarray(instances[k].mask, dtype=bool)] = instances[k].category_id
    return semantic


# --------------------------------------------------------------------------------------------
# Staged output
# --------------------------------------------------------------------------------------------


def check_output(out: Path, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output folder that is (or lies inside) a source, or that holds files (without
    ``overwrite``)."""
    out_resolved = out.resolve()
    for src in sources:
        src_resolved = Path(src).resolve()
        if out_resolved == src_resolved or src_resolved in out_resolved.parents:
            raise DatasetdmError(f"{out}: lies inside the source {src}; choose an output folder outside it")
    if out.exists() and not out.is_dir():
        raise DatasetdmError(f"{out}: exists and is not a folder")
    if out.is_dir() and not overwrite and any(not p.name.startswith(".") for p in out.iterdir()):
        raise DatasetdmError(f"{out}: not empty; choose a new or empty folder, or pass --overwrite")


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool, last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``out``; when the block succeeds, move its contents
    into ``out``. When it raises, the staging folder is deleted and ``out`` is untouched.

    ``out`` must be new or empty unless ``overwrite``; then only the entries the new output has
    are replaced (other files in ``out`` stay). Entries named in ``last`` move last, so the file
    that marks a folder complete (annotations.json) appears only after everything else.

    Holds ``out``'s lock (``io.output_lock``) throughout, so a second run on the same ``out`` is
    refused; the staging folder is named like ``io.atomic_folder``'s temporaries, so one left by a
    killed run is removed by the next run on ``out``.
    """
    out = Path(out)
    with output_lock(out):
        check_output(out, (), overwrite)
        stage = new_staging_folder(out)
        try:
            yield stage
            if not out.exists():
                os.replace(stage, out)
                return
            names = sorted(os.listdir(stage), key=lambda n: (n in last, last.index(n) if n in last else 0, n))
            for name in names:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                os.replace(stage / name, target)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# What exporters and merge read: a labelled folder or a generate run's shards
# --------------------------------------------------------------------------------------------


@dataclass
class SampleSource:
    path: Path
    categories: list[Category]
    tasks: tuple[str, ...]
    count: int
    samples: Callable[[], Iterator[LabelledSample]]


# the generation record an export keeps from a shard sample's meta (what users filter on)
_SHARD_META = ("id", "seed", "classes", "scores")


def open_samples(path: str | os.PathLike, annotator: str | None = None) -> SampleSource:
    """A labelled folder or a ``generate`` run folder (its kept samples), read lazily.

    ``annotator`` (shards only) takes the labels of a second annotator of the same kind."""
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.formats.shards import is_shard_folder, read_manifest, read_shards, shard_categories

    path = Path(path)
    if is_shard_folder(path):
        table = read_manifest(path)
        count = sum(bool(k) for k in table.column("kept").to_pylist())

        def shard_samples() -> Iterator[LabelledSample]:
            for sample, extras in read_shards(path, with_extras=True):
                if annotator is not None:
                    extra = extras.get(annotator)
                    if extra is None:
                        raise DatasetdmError(f"{path}: sample {sample.id} has no labels from annotator {annotator!r}")
                    for name in ("semantic", "instances", "depth"):
                        if getattr(extra, name) is not None:
                            setattr(sample, name, getattr(extra, name))
                sample.meta = {k: sample.meta[k] for k in _SHARD_META if k in sample.meta}
                yield sample

        first = next(iter(read_shards(path)), None)
        tasks = () if first is None else _tasks_of(first)
        return SampleSource(path, shard_categories(path), tasks, count, shard_samples)
    if annotator is not None:
        raise DatasetdmError(f"{path}: --annotator applies to a generate run's shards, not to a labelled folder")
    if not path.is_dir():
        raise DatasetdmError(f"{path}: not a folder (expected a labelled folder or a generate run's shard folder)")
    folder = read_labelled_folder(path)
    return SampleSource(path, folder.categories, folder.tasks, len(folder), lambda: iter(folder))


def _tasks_of(sample: LabelledSample) -> tuple[str, ...]:
    tasks = [k for k in ("semantic", "instances", "depth") if getattr(sample, k) is not None]
    if any(inst.keypoints is not None for inst in sample.instances or []):
        tasks.append("keypoints")
    if sample.caption is not None:
        tasks.append("captions")
    return tuple(tasks)
