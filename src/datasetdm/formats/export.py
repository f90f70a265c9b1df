"""A generate run's shards -> a plain labelled folder (images, palettized masks, COCO JSON, uint16
depth): ``formats.layouts.export_dataset(..., "folder")``, the one exporter, for shard input.

The folder is what pycocotools, VOC-style loaders and ``datasetdm train`` read (see
``labelled_folder``). Only kept samples are exported; each image's COCO entry keeps the prompt as
``caption`` and the generation record (seed, classes, scores) in ``meta``.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasetdm.formats.shards import read_run_info


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
    from datasetdm.formats.layouts import export_dataset

    read_run_info(shard_dir)  # shards only: anything else is refused by its missing run.json
    return export_dataset(Path(shard_dir), Path(out_dir), "folder", annotator=annotator, limit=limit,
                          overwrite=overwrite).samples
