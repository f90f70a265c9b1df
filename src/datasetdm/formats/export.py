"""Shards -> a plain labelled folder (images, palettized masks, COCO JSON, uint16 depth).

The folder is what pycocotools, VOC-style loaders and ``datasetdm train`` read (see
``labelled_folder``). Only kept samples are exported; each image's COCO entry keeps the prompt as
``caption`` and the generation record (seed, scores, classes) in ``meta``.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasetdm.errors import DatasetdmError
from datasetdm.formats.labelled_folder import LabelledFolderWriter
from datasetdm.formats.shards import read_shards, shard_categories


def export_shards(
    shard_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    annotator: str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
) -> int:
    """Write the kept samples of ``shard_dir`` to a labelled folder; return how many.

    ``annotator`` exports the labels of a second annotator of the same kind (an "extra" in the
    shards) in place of the primary ones.
    """
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    if out_dir.resolve() == shard_dir.resolve():
        raise DatasetdmError(f"{out_dir}: export into its own shard folder; choose another output folder")
    categories = shard_categories(shard_dir)
    count = 0
    with LabelledFolderWriter(out_dir, categories, overwrite=overwrite) as writer:
        for sample, extras in read_shards(shard_dir, with_extras=True):
            if limit is not None and count >= limit:
                break
            if annotator is not None:
                extra = extras.get(annotator)
                if extra is None:
                    raise DatasetdmError(f"{shard_dir}: sample {sample.id} has no labels from annotator {annotator!r}")
                for field in ("semantic", "instances", "depth"):
                    if getattr(extra, field) is not None:
                        setattr(sample, field, getattr(extra, field))
            # keep what a user filters on; scores may be None (JSON null), which is fine
            sample.meta = {k: sample.meta[k] for k in ("id", "seed", "classes", "scores") if k in sample.meta}
            writer.add(sample)
            count += 1
    return count
