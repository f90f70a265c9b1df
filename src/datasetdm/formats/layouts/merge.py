"""Merge labelled folders (or generate runs) into one, e.g. real + synthetic for joint training.

Categories are matched by name (case and surrounding spaces ignored); the first source keeps its
ids, a class new in a later source keeps its own id when free and takes the lowest free id
otherwise, and every mask and instance is remapped to the merged ids. Sample ids are prefixed
with their source's name (``{prefix}_{id}``; default: the source folder's name) so they stay
unique, and ``meta["source"]`` records the prefix. A label kind (semantic, instances, depth)
survives only when every source has it, because a folder carries the same kinds for all images.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.labelled_folder import ANNOTATIONS_FILE, LabelledFolderWriter
from datasetdm.formats.layouts.common import check_output, open_samples, staged_output
from datasetdm.formats.sample import Category, Instance, LabelledSample
from datasetdm.progress import progress_bar

LABEL_KINDS = ("semantic", "instances", "depth")


@dataclass
class MergeSummary:
    samples: int
    categories: list[Category]
    per_source: dict[str, int]
    notes: list[str]


def _key(name: str) -> str:
    return " ".join(name.lower().split())


def merge_categories(lists: Sequence[Sequence[Category]]) -> tuple[list[Category], list[np.ndarray]]:
    """Merged categories and, per source, a 256-entry lookup table old id -> merged id."""
    merged: dict[int, Category] = {}
    by_name: dict[str, int] = {}
    tables = []
    for categories in lists:
        table = np.arange(256, dtype=np.uint8)  # 0 background and 255 ignore map to themselves
        for c in categories:
            if not 1 <= c.id <= 254:
                raise DatasetdmError(f"class {c.name!r}: id {c.id} outside 1..254, cannot be merged")
            existing = by_name.get(_key(c.name))
            if existing is None:
                new_id = c.id if c.id not in merged else min(set(range(1, 255)) - set(merged))
                merged[new_id] = replace(c, id=new_id)
                by_name[_key(c.name)] = new_id
                existing = new_id
            else:
                kept = merged[existing]
                if c.keypoints and kept.keypoints and tuple(c.keypoints) != tuple(kept.keypoints):
                    raise DatasetdmError(f"class {c.name!r}: the sources name its keypoints differently")
                if c.keypoints and not kept.keypoints:
                    merged[existing] = replace(kept, keypoints=c.keypoints, skeleton=c.skeleton)
            table[c.id] = existing
        tables.append(table)
    return sorted(merged.values(), key=lambda c: c.id), tables


def _prefixes(paths: Sequence[Path], prefixes: Sequence[str] | None) -> list[str]:
    if prefixes is None:
        prefixes = [re.sub(r"[^A-Za-z0-9._-]+", "-", p.resolve().name) or "source" for p in paths]
        # two folders of the same name (run1/data, run2/data): number them
        if len(set(prefixes)) != len(prefixes):
            prefixes = [f"{p}{i + 1}" for i, p in enumerate(prefixes)]
    if len(prefixes) != len(paths):
        raise DatasetdmError(f"--prefix: {len(prefixes)} prefixes for {len(paths)} sources")
    for p in prefixes:
        if not p or "/" in p or "\\" in p or p.startswith("."):
            raise DatasetdmError(f"--prefix {p!r}: must be a non-empty file name part")
    if len(set(prefixes)) != len(prefixes):
        raise DatasetdmError(f"--prefix: prefixes must differ, got {list(prefixes)}")
    return list(prefixes)


def merge_folders(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    prefixes: Sequence[str] | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> MergeSummary:
    paths = [Path(s) for s in sources]
    if len(paths) < 2:
        raise DatasetdmError("merge needs at least two sources")
    out = Path(out)
    check_output(out, paths, overwrite)
    names = _prefixes(paths, prefixes)
    opened = [open_samples(p) for p in paths]
    categories, tables = merge_categories([s.categories for s in opened])
    kinds = [k for k in LABEL_KINDS if all(k in s.tasks for s in opened)]
    notes = []
    for k in LABEL_KINDS:
        having = [str(s.path) for s in opened if k in s.tasks]
        if having and k not in kinds:
            notes.append(f"{k}: only in {', '.join(having)}; dropped (every image of a folder needs the same label kinds)")
    per_source = {}
    with staged_output(out, overwrite=overwrite, last=(ANNOTATIONS_FILE,)) as stage:
        with LabelledFolderWriter(stage, categories) as writer, progress_bar(enabled=show_progress) as bar:
            task = bar.add_task("merge", total=sum(s.count for s in opened))
            for source, name, table in zip(opened, names, tables):
                count = 0
                for sample in source.samples():
                    writer.add(_remap(sample, name, table, kinds))
                    count += 1
                    bar.advance(task)
                per_source[str(source.path)] = count
    return MergeSummary(sum(per_source.values()), categories, per_source, notes)


def _remap(sample: LabelledSample, prefix: str, table: np.ndarray, kinds: list[str]) -> LabelledSample:
    semantic = table[sample.semantic] if "semantic" in kinds else None
    instances = None
    if "instances" in kinds:
        instances = [Instance(int(table[i.category_id]), i.mask, i.keypoints, i.score) for i in sample.instances or []]
    return LabelledSample(
        id=f"{prefix}_{sample.id}",
        image=sample.image,
        caption=sample.caption,
        semantic=semantic,
        instances=instances,
        depth=sample.depth if "depth" in kinds else None,
        meta={**sample.meta, "source": prefix},
    )
