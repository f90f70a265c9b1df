"""Few-shot selection as the DatasetDM paper trains its decoders: K images per class (VOC: 5 per
class, 100 images), or N images for task-agnostic sets (NYU depth: 50; COCO persons: 800).

Both are deterministic: items are put in a canonical order (by id, so the file system's listing
order does not matter) and shuffled with ``random.Random(seed)``; the same seed and the same data
set give the same selection on any machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from datasetdm.errors import DatasetdmError
from datasetdm.formats.layouts.common import SourceItem
from datasetdm.formats.sample import Category


@dataclass
class Selection:
    items: list[SourceItem]
    # class name -> images chosen for it, when --per-class asked for more than the data set has
    shortfall: dict[str, int] = field(default_factory=dict)


def _shuffled(items: Sequence[SourceItem], seed: int) -> list[SourceItem]:
    order = sorted(items, key=lambda item: item.id)
    random.Random(seed).shuffle(order)
    return order


def select_n_images(items: Sequence[SourceItem], n: int, seed: int) -> Selection:
    """``n`` images drawn without replacement (all of them when there are fewer), in id order."""
    if n < 1:
        raise DatasetdmError(f"--n-images {n}: must be at least 1")
    chosen = _shuffled(items, seed)[:n]
    return Selection(sorted(chosen, key=lambda item: item.id))


def select_per_class(
    items: Sequence[SourceItem], categories: Sequence[Category], k: int, seed: int
) -> Selection:
    """``k`` images for every class, distinct images throughout (so VOC's 20 classes at k = 5
    give 100 images, as in the paper).

    Classes choose in order of how few images show them (rarest first; ties by id), so a rare
    class is not left without images because a common class took them. Each class takes, from
    the seeded shuffle, the first ``k`` images showing it that no class took yet. ``shortfall``
    names the classes that fewer than ``k`` of the chosen images show (all the data set had, or
    all that other classes left).
    """
    if k < 1:
        raise DatasetdmError(f"--per-class {k}: must be at least 1")
    order = _shuffled(items, seed)
    shows: dict[int, list[SourceItem]] = {c.id: [] for c in categories}
    classes_of: dict[str, frozenset[int]] = {}
    for item in order:
        if item.class_ids is None:
            raise DatasetdmError("--per-class: this data set has no classes; use --n-images")
        classes_of[item.id] = item.class_ids()
        for class_id in classes_of[item.id]:
            if class_id in shows:
                shows[class_id].append(item)
    taken: set[str] = set()
    chosen: list[SourceItem] = []
    for class_id in sorted(shows, key=lambda c: (len(shows[c]), c)):
        fresh = [item for item in shows[class_id] if item.id not in taken][:k]
        taken.update(item.id for item in fresh)
        chosen += fresh
    shortfall = {}
    for c in categories:
        shown = sum(c.id in classes_of[item.id] for item in chosen)
        if shown < k:
            shortfall[c.name] = shown
    return Selection(sorted(chosen, key=lambda item: item.id), shortfall)
