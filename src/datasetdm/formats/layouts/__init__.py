"""The standard data set layouts, in and out of the labelled folder.

``import_dataset`` reads VOC 2012, COCO 2017, Cityscapes, ADE20K (SceneParsing) or NYU Depth v2
as the data set ships and writes a labelled folder, optionally only a few-shot selection of it;
``export_dataset`` writes a labelled folder or a generate run's shards as a labelled folder, VOC,
COCO, Cityscapes or a Hugging Face Parquet folder; ``merge_folders`` joins folders. Each
layout's conventions are in its module's docstring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from datasetdm.errors import DatasetdmError
from datasetdm.formats.labelled_folder import ANNOTATIONS_FILE, LabelledFolderWriter
from datasetdm.formats.layouts.common import (
    IMPORT_RECORD,
    ScannedDataset,
    SourceItem,
    check_output,
    open_samples,
    staged_output,
)
from datasetdm.formats.layouts.merge import MergeSummary, merge_folders
from datasetdm.formats.layouts.selection import select_n_images, select_per_class
from datasetdm.formats.sample import IGNORE_INDEX, Category, LabelledSample
from datasetdm.io import write_json_atomic
from datasetdm.progress import progress_bar

IMPORT_FORMATS = ("voc", "coco", "cityscapes", "ade20k", "nyu")
EXPORT_FORMATS = ("folder", "voc", "coco", "cityscapes", "hf")

__all__ = [
    "EXPORT_FORMATS", "IMPORT_FORMATS", "ExportSummary", "ImportOptions", "ImportSummary", "MergeSummary",
    "cached_import", "export_dataset", "import_dataset", "merge_folders", "scan_dataset",
]


@dataclass(frozen=True)
class ImportOptions:
    split: str = "train"
    per_class: int | None = None  # K images per class (few-shot, as the paper's VOC/COCO sets)
    n_images: int | None = None  # N images (task-agnostic sets: NYU depth, COCO persons)
    seed: int = 0
    classes: tuple[str, ...] | None = None  # keep only these classes (others become background)
    depth_scale: float = 0.001  # NYU: metres per unit of the depth PNGs

    def record(self, fmt: str, src: Path) -> dict:
        """What an import depends on (``train --format`` reuses an import whose record matches)."""
        return {"format": fmt, "source": str(Path(src).resolve()), "split": self.split, "per_class": self.per_class,
                "n_images": self.n_images, "seed": self.seed,
                "classes": list(self.classes) if self.classes is not None else None, "depth_scale": self.depth_scale}


@dataclass
class ImportSummary:
    out: Path
    format: str
    samples: int
    available: int
    categories: list[Category]
    shortfall: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def scan_dataset(fmt: str, src: str | os.PathLike, options: ImportOptions = ImportOptions()) -> ScannedDataset:
    """The data set at ``src`` in layout ``fmt``, scanned (lists and pairs checked, nothing decoded)."""
    from datasetdm.formats.layouts.ade20k import scan_ade20k
    from datasetdm.formats.layouts.cityscapes import scan_cityscapes
    from datasetdm.formats.layouts.coco import scan_coco
    from datasetdm.formats.layouts.nyu import scan_nyu
    from datasetdm.formats.layouts.voc import scan_voc

    src = Path(src)
    if not src.is_dir():
        raise DatasetdmError(f"{src}: not a folder (the {fmt} data set as it ships)")
    if fmt == "voc":
        return scan_voc(src, options.split)
    if fmt == "coco":
        return scan_coco(src, options.split)
    if fmt == "cityscapes":
        return scan_cityscapes(src, options.split)
    if fmt == "ade20k":
        return scan_ade20k(src, options.split)
    if fmt == "nyu":
        return scan_nyu(src, options.depth_scale)
    raise DatasetdmError(f"--format {fmt!r}: unknown; choose one of {', '.join(IMPORT_FORMATS)}")


def _keep_classes(dataset: ScannedDataset, names: Sequence[str]) -> list[Category]:
    by_name = {c.name: c for c in dataset.categories}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DatasetdmError(f"--classes: {unknown} not in this data set; its classes: "
                             f"{', '.join(c.name for c in dataset.categories)}")
    return [c for c in dataset.categories if c.name in set(names)]


def _restrict(sample: LabelledSample, keep: set[int]) -> LabelledSample:
    """Drop the classes outside ``keep``: their pixels become background, their instances go."""
    if sample.semantic is not None:
        other = (sample.semantic != 0) & (sample.semantic != IGNORE_INDEX)
        for class_id in keep:
            other &= sample.semantic != class_id
        sample.semantic = sample.semantic.copy()
        sample.semantic[other] = 0
    if sample.instances is not None:
        sample.instances = [inst for inst in sample.instances if inst.category_id in keep]
    return sample


def _read_classes_once(items: list[SourceItem], fmt: str, show_progress: bool) -> list[SourceItem]:
    """Items whose classes are read now, once (a label PNG per image for most layouts), with a
    progress bar: selection and the class filter both ask for them."""
    known = []
    with progress_bar(enabled=show_progress) as bar:
        task = bar.add_task(f"read {fmt} classes", total=len(items))
        for item in items:
            class_ids = item.class_ids()
            known.append(replace(item, class_ids=lambda class_ids=class_ids: class_ids))
            bar.advance(task)
    return known


def import_dataset(
    fmt: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ImportOptions = ImportOptions(),
    *,
    overwrite: bool = False,
    show_progress: bool = False,
) -> ImportSummary:
    """Import the data set at ``src`` (layout ``fmt``) into the labelled folder ``out``.

    With ``options.classes`` only images showing one of those classes are candidates, and other
    classes' pixels become background (0). ``per_class`` and ``n_images`` select a few-shot
    subset (see ``selection``). The folder gets an ``import.json`` recording the options. Nothing
    is left in ``out`` when a file turns out to be malformed (the output is staged).
    """
    src, out = Path(src), Path(out)
    check_output(out, [src], overwrite)
    if options.per_class is not None and options.n_images is not None:
        raise DatasetdmError("--per-class and --n-images: choose one")
    dataset = scan_dataset(fmt, src, options)
    categories, items, notes = dataset.categories, dataset.items, list(dataset.notes)
    if categories and (options.classes is not None or options.per_class is not None):
        items = _read_classes_once(items, fmt, show_progress)
    keep = None
    if options.classes is not None:
        if not categories:
            raise DatasetdmError(f"--classes: the {fmt} data set has no classes")
        categories = _keep_classes(dataset, options.classes)
        keep = {c.id for c in categories}
        items = [item for item in items if item.class_ids() & keep]
    shortfall = {}
    if options.per_class is not None:
        if not categories:
            raise DatasetdmError(f"--per-class: the {fmt} data set has no classes; use --n-images")
        selection = select_per_class(items, categories, options.per_class, options.seed)
        items, shortfall = selection.items, selection.shortfall
    elif options.n_images is not None:
        items = select_n_images(items, options.n_images, options.seed).items
    if not items:
        raise DatasetdmError(f"{src}: no images to import" + (" with these --classes" if keep else ""))
    with staged_output(out, overwrite=overwrite, last=(ANNOTATIONS_FILE,)) as stage:
        with LabelledFolderWriter(stage, categories) as writer, progress_bar(enabled=show_progress) as bar:
            task = bar.add_task(f"import {fmt}", total=len(items))
            for item in items:
                sample = item.load()
                writer.add(_restrict(sample, keep) if keep is not None else sample)
                bar.advance(task)
        record = options.record(fmt, src)
        record.update(samples=len(items), available=len(dataset.items), shortfall=shortfall, notes=notes)
        write_json_atomic(stage / IMPORT_RECORD, record)
    return ImportSummary(out, fmt, len(items), len(dataset.items), categories, shortfall, notes)


def cached_import(
    fmt: str,
    src: str | os.PathLike,
    cache_dir: str | os.PathLike,
    options: ImportOptions = ImportOptions(),
    *,
    show_progress: bool = False,
) -> Path:
    """The labelled folder of importing ``src`` with ``options``, under ``cache_dir``; imported
    on the first call and reused while its ``import.json`` records the same format, source and
    options (what ``train --data SRC --format F`` trains on).

    Each set of options has its own folder (``{fmt}-{hash of the options}``); an import that
    failed leaves nothing, so the next call imports again.
    """
    import hashlib
    import json

    record = options.record(fmt, Path(src))
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"{fmt}-{digest}"
    recorded = folder / IMPORT_RECORD
    if recorded.is_file() and (folder / ANNOTATIONS_FILE).is_file():
        try:
            previous = json.loads(recorded.read_text())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and all(previous.get(k) == v for k, v in record.items()):
            return folder
    import_dataset(fmt, src, folder, options, overwrite=True, show_progress=show_progress)
    return folder


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    out: Path
    format: str
    samples: int
    notes: list[str] = field(default_factory=list)


def export_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "folder",
    *,
    split: str = "train",
    annotator: str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> ExportSummary:
    """Write ``src`` (a labelled folder or a generate run's shards) to ``out`` in layout ``fmt``:
    the one exporter (``datasetdm export``, ``formats.export.export_shards``, the demo's export).

    A failure leaves ``out`` as it was. ``folder``: ``LabelledFolderWriter`` builds the folder
    beside ``out`` and replaces a labelled folder there as a whole (only with ``overwrite``; never
    a folder of other files); the other layouts are staged and moved into ``out``. ``limit``
    exports the first N; ``annotator`` (shards) the labels of a second annotator instead.
    """
    from datasetdm.formats.layouts.cityscapes import export_cityscapes
    from datasetdm.formats.layouts.coco import export_coco
    from datasetdm.formats.layouts.hf import export_hf
    from datasetdm.formats.layouts.voc import export_voc

    writers = {"voc": export_voc, "coco": export_coco, "cityscapes": export_cityscapes, "hf": export_hf}
    if fmt not in EXPORT_FORMATS:
        raise DatasetdmError(f"--format {fmt!r}: unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DatasetdmError(f"{src}: does not exist (expected a labelled folder or a generate run's shard folder)")
    # the folder writer decides itself whether an existing `out` may be replaced (check_replaceable)
    check_output(out, [src], overwrite or fmt == "folder")
    source = open_samples(src, annotator)
    if limit is not None:
        source = _limited(source, limit)
    count = 0
    with progress_bar(enabled=show_progress) as bar:
        task = bar.add_task(f"export {fmt}", total=source.count)

        def advance() -> None:
            nonlocal count
            count += 1
            bar.advance(task)

        if fmt == "folder":
            with LabelledFolderWriter(out, source.categories, overwrite=overwrite) as writer:
                for sample in source.samples():
                    writer.add(sample)
                    advance()
            return ExportSummary(out, fmt, count, [])
        with staged_output(out, overwrite=overwrite, last=(ANNOTATIONS_FILE,)) as stage:
            notes = writers[fmt](source, stage, split, advance)
    return ExportSummary(out, fmt, count, notes)


def _limited(source, limit: int):
    from itertools import islice

    if limit < 0:
        raise DatasetdmError(f"--limit {limit}: must be at least 0")
    return replace(source, count=min(source.count, limit), samples=lambda: islice(source.samples(), limit))
