"""A Hugging Face ``datasets`` Parquet folder, written with pyarrow alone.

Layout::

    data/{split}-00000-of-00001.parquet
    id2label.json                          {"0": "background", "1": <name>, ...} (mask pixel values)

Columns (``datasets`` features, stored in the Parquet schema's ``huggingface`` metadata so that
``datasets.load_dataset("parquet", data_files=...)`` decodes the images):

    id         string          the sample id
    image      Image           PNG bytes
    semantic   Image           palette PNG: pixel = class id, 0 background, 255 ignore (if present)
    depth      Image           16-bit PNG, millimetres, 0 = no depth (if present)
    caption    string          (null where an image has none)
    objects    list of {category_id, bbox [x, y, w, h], area, segmentation {size, counts}
               (COCO compressed RLE), keypoints (x, y, v flattened; empty if none)} (if instances)

Rows are written in row groups as they come, so memory does not grow with the data set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.coco import instance_to_annotation
from datasetdm.formats.layouts.common import SampleSource
from datasetdm.formats.png import encode_depth_png, encode_image_png, encode_semantic_png
from datasetdm.io import atomic_path, write_json_atomic

ROWS_PER_GROUP = 256
ID2LABEL_FILE = "id2label.json"


def _value(dtype: str) -> dict:
    return {"dtype": dtype, "_type": "Value"}


def _features(columns: list[str]) -> dict:
    # A plain list [feature] is the "list of" shorthand every datasets version reads.
    object_feature = {
        "category_id": _value("int64"),
        "bbox": [_value("float64")],
        "area": _value("int64"),
        "segmentation": {"size": [_value("int64")], "counts": _value("string")},
        "keypoints": [_value("float64")],
    }
    every = {
        "id": _value("string"),
        "image": {"_type": "Image"},
        "semantic": {"_type": "Image"},
        "depth": {"_type": "Image"},
        "caption": _value("string"),
        "objects": [object_feature],
    }
    return {name: every[name] for name in columns}


def _schema(columns: list[str]):
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    obj = pa.struct([
        ("category_id", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
        ("area", pa.int64()),
        ("segmentation", pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])),
        ("keypoints", pa.list_(pa.float64())),
    ])
    every = {"id": pa.string(), "image": image, "semantic": image, "depth": image, "caption": pa.string(),
             "objects": pa.list_(obj)}
    metadata = {"huggingface": json.dumps({"info": {"features": _features(columns)}})}
    return pa.schema([(name, every[name]) for name in columns], metadata=metadata)


def _row(sample, columns: list[str]) -> dict:
    row = {"id": sample.id, "image": {"bytes": encode_image_png(sample.image), "path": f"{sample.id}.png"}}
    if "semantic" in columns:
        row["semantic"] = {"bytes": encode_semantic_png(sample.semantic), "path": f"{sample.id}.semantic.png"}
    if "depth" in columns:
        row["depth"] = {"bytes": encode_depth_png(sample.depth, sample.id), "path": f"{sample.id}.depth.png"}
    if "caption" in columns:
        row["caption"] = sample.caption
    if "objects" in columns:
        objects = []
        for k, inst in enumerate(sample.instances or []):
            ann = instance_to_annotation(inst, k + 1, 0)
            objects.append({
                "category_id": ann["category_id"], "bbox": ann["bbox"], "area": ann["area"],
                "segmentation": {"size": list(ann["segmentation"]["size"]), "counts": ann["segmentation"]["counts"]},
                "keypoints": [float(v) for v in ann.get("keypoints", [])],
            })
        row["objects"] = objects
    return row


def export_hf(source: SampleSource, stage: Path, split: str, advance: Callable[[], None]) -> list[str]:
    """Write ``source`` as a Parquet folder ``datasets`` loads (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["id", "image"]
    columns += [c for c, task in (("semantic", "semantic"), ("depth", "depth"), ("caption", "captions"),
                                  ("objects", "instances")) if task in source.tasks]
    schema = _schema(columns)
    path = stage / "data" / f"{split}-00000-of-00001.parquet"
    rows: list[dict] = []
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for sample in source.samples():
                for name, task in (("semantic", "semantic"), ("depth", "depth")):
                    if name in columns and getattr(sample, name) is None:
                        raise DatasetdmError(f"{source.path}: sample {sample.id!r} has no {task}, other samples do")
                rows.append(_row(sample, columns))
                if len(rows) == ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
                advance()
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    id2label = {"0": "background", **{str(c.id): c.name for c in source.categories}}
    write_json_atomic(stage / ID2LABEL_FILE, id2label)
    return [] if "depth" not in columns else ["depth column: 16-bit PNG in millimetres (0 = no depth)"]


def read_hf_rows(path: str | Path) -> list[dict]:
    """The rows of an exported Parquet file with images decoded to arrays (for checks and tests)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        for name in ("image", "semantic", "depth"):
            if row.get(name) is not None:
                row[name] = np.asarray(Image.open(io.BytesIO(row[name]["bytes"])))
    return rows
