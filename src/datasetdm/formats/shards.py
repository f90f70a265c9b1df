"""WebDataset tar shards plus a Parquet manifest: generation's output at scale.

Layout of an output folder ``DIR``::

    DIR/run.json                   run config (checked on resume), categories, samples per shard
    DIR/shards/shard-000000.tar    WebDataset shards; shard k holds the kept samples with ids in
                                   [k * S, (k + 1) * S), S = samples_per_shard
    DIR/manifest.parquet           one row per generated sample id, kept or dropped (and why)

One sample in a shard, with key ``{id:09d}`` (no dots: WebDataset splits a name at its first dot)::

    {key}.png                 RGB image
    {key}.semantic.png        palettized PNG, pixel = category id, 0 background, 255 ignore
    {key}.depth.png           uint16 PNG, millimetres, 0 = no depth
    {key}.json                prompt, classes, seed, scores, size, categories, depth_scale and
                              instances as COCO annotations (RLE masks, keypoints with visibility)
    {key}.{annotator}.semantic.png / .depth.png
                              labels from a second annotator of the same kind (see "extras")

A sample's files follow one another in name order (webdataset's ``TarWriter`` writes them, with
a fixed mtime, owner and mode, so the same samples always give the same bytes).

Crash safety: a shard is written to a hidden temporary name and renamed when complete; then the
manifest is rewritten atomically. The manifest is the record of truth: on resume, a shard it does
not list (a temporary, or a shard renamed just before a kill -9) is deleted and regenerated, and
generation continues after the last sample id it lists. Shard boundaries depend only on sample
ids, so a resumed run writes byte-identical shards to an uninterrupted one.

Reading stays on ``tarfile``: webdataset's iterator ends quietly where a shard is cut at a member
boundary, which ``iter_shard_files`` must report, and export and view then need no torch import.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from datasetdm.errors import DatasetdmError
from datasetdm.formats import coco
from datasetdm.formats.png import DEPTH_SCALE, encode_depth_png, encode_image_png, encode_semantic_png
from datasetdm.formats.sample import Category, LabelledSample
from datasetdm.io import atomic_path, naming_path, remove_atomic_temporaries, write_json_atomic

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.parquet"
SHARD_DIR = "shards"
FORMAT = "datasetdm-shards"
FORMAT_VERSION = 1
# Manifest columns besides the per-score ones (score_{name}, float64, null when not computed).
BASE_COLUMNS = ("id", "key", "shard", "prompt", "classes", "seed", "kept", "dropped_reason", "backbone", "versions")



def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(sample_id: int) -> str:
    return f"{sample_id:09d}"


# --------------------------------------------------------------------------------------------
# Encoding one sample
# --------------------------------------------------------------------------------------------


def _labels_json(sample: LabelledSample, sample_id: int) -> list[dict] | None:
    if sample.instances is None:
        return None
    return [coco.instance_to_annotation(inst, k + 1, sample_id) for k, inst in enumerate(sample.instances)]


def encode_sample(
    sample_id: int,
    sample: LabelledSample,
    info: dict,
    categories: list[Category],
    extras: dict[str, LabelledSample] | None = None,
) -> dict[str, bytes]:
    """The files of one shard sample, ``{extension: bytes}`` (extension without the key).

    ``info`` goes into the JSON as is (prompt, classes, seed, scores, ...). ``extras`` are labels
    from further annotators, stored under their name.
    """
    files = {"png": encode_image_png(sample.image)}
    height, width = sample.size
    meta = {
        "id": sample_id,
        "key": sample_key(sample_id),
        **info,
        "size": [height, width],
        "categories": [coco.category_to_coco(c) for c in categories],
        "instances": _labels_json(sample, sample_id),
    }
    if sample.semantic is not None:
        files["semantic.png"] = encode_semantic_png(sample.semantic)
    if sample.depth is not None:
        files["depth.png"] = encode_depth_png(sample.depth, f"sample {sample_id}")
        meta["depth_scale"] = DEPTH_SCALE
    if extras:
        meta["extras"] = {}
        for name, extra in extras.items():
            if "." in name or "/" in name or not name:
                raise DatasetdmError(f"annotator name {name!r}: must be non-empty, without '.' or '/'")
            entry = {}
            if extra.semantic is not None:
                files[f"{name}.semantic.png"] = encode_semantic_png(extra.semantic)
                entry["semantic"] = f"{name}.semantic.png"
            if extra.depth is not None:
                files[f"{name}.depth.png"] = encode_depth_png(extra.depth, f"sample {sample_id} ({name})")
                entry["depth"] = f"{name}.depth.png"
            if extra.instances is not None:
                entry["instances"] = _labels_json(extra, sample_id)
            meta["extras"][name] = entry
    files["json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def _open_png(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:
        raise DatasetdmError(f"{where}: not a readable PNG ({e})") from None
    return image


def _decode_labels(files: dict[str, bytes], meta: dict, prefix: str, instances, where: str) -> LabelledSample:
    height, width = meta["size"]
    semantic = depth = None
    if f"{prefix}semantic.png" in files:
        semantic = np.asarray(_open_png(files[f"{prefix}semantic.png"], f"{where}.{prefix}semantic.png"), dtype=np.uint8)
    if f"{prefix}depth.png" in files:
        raw = np.asarray(_open_png(files[f"{prefix}depth.png"], f"{where}.{prefix}depth.png"))
        depth = (raw.astype(np.float64) * meta.get("depth_scale", DEPTH_SCALE)).astype(np.float32)
    if instances is not None:
        instances = [coco.annotation_to_instance(a, height, width) for a in instances]
    return LabelledSample(id=meta["key"], image=np.zeros((height, width, 3), np.uint8), semantic=semantic, instances=instances, depth=depth)


def decode_sample(files: dict[str, bytes], where: str = "sample") -> tuple[LabelledSample, dict[str, LabelledSample]]:
    """Inverse of ``encode_sample``: the sample (caption = prompt; meta = the JSON's prompt,
    classes, seed and scores) and the extras by annotator name."""
    try:
        meta = json.loads(files["json"])
    except (KeyError, ValueError) as e:
        raise DatasetdmError(f"{where}: missing or invalid .json ({e})") from None
    if "png" not in files:
        raise DatasetdmError(f"{where}: missing .png image")
    image = np.asarray(_open_png(files["png"], f"{where}.png").convert("RGB"), dtype=np.uint8)
    sample = _decode_labels(files, meta, "", meta.get("instances"), where)
    sample.image = image
    sample.caption = meta.get("prompt")
    sample.meta = {k: meta[k] for k in ("id", "prompt", "classes", "seed", "scores", "annotators") if k in meta}
    extras = {}
    for name, entry in (meta.get("extras") or {}).items():
        extras[name] = _decode_labels(files, meta, f"{name}.", entry.get("instances"), where)
        extras[name].id = sample.id
        extras[name].image = image
    return sample, extras


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("datasetdm", "torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def _scores(row: dict) -> dict[str, float | None]:
    return {k: (None if v is None else float(v)) for k, v in (row.get("scores") or {}).items()}


def encode_kept(sample_id: int, row: dict, sample: LabelledSample, categories: list[Category],
                extras: dict[str, LabelledSample] | None = None) -> dict[str, bytes]:
    """The shard files of a kept sample, exactly as ``ShardWriter.add`` writes them: a worker
    process can encode and the writer then stores the bytes (``ShardWriter.add_files``)."""
    info = {k: v for k, v in row.items() if k != "dropped_reason"}
    info["scores"] = _scores(row)
    return encode_sample(sample_id, sample, info, list(categories), extras)


def _tar_writer(file):
    from webdataset.writer import TarWriter

    # Fixed metadata (no clock, no user): the same samples always give the same bytes.
    return TarWriter(file, user="", group="", mode=0o644, encoder=False, mtime=0)


@dataclass
class _OpenShard:
    index: int
    tmp: Path
    file: object  # the open temporary file, fsynced before the rename
    tar: object  # webdataset.writer.TarWriter over ``file``
    rows: list[dict] = field(default_factory=list)


class ShardWriter:
    """Writes samples in sample-id order into shards of ``samples_per_shard`` ids each.

    ``config`` describes the run (seed, prompts, backbone, annotators, filters); a resumed run
    must pass the same config, or generation would mix two different datasets. ``backbone`` and
    the package versions go into every manifest row.

    Usage::

        writer = ShardWriter(out, categories, config, samples_per_shard=1000, resume=True)
        for sample_id in range(writer.resume_from(n), n):
            writer.add(sample_id, row, sample)  # sample None when a filter dropped it
        writer.close()
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        categories: list[Category],
        config: dict,
        samples_per_shard: int = 1000,
        backbone: str = "",
        resume: bool = False,
    ):
        if samples_per_shard < 1:
            raise DatasetdmError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.shard_dir = self.out_dir / SHARD_DIR
        self.categories = list(categories)
        self.config = json.loads(json.dumps(config))  # plain JSON types, so comparisons are exact
        self.samples_per_shard = samples_per_shard
        self.backbone = backbone
        self.versions = json.dumps(_versions(), sort_keys=True)
        self._rows: list[dict] = []
        self._score_names: list[str] = []
        self._open: _OpenShard | None = None
        self._next_id = 0
        self._start(resume)

    # ---- run state ------------------------------------------------------------------------

    def _run_info(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "samples_per_shard": self.samples_per_shard,
            "categories": [coco.category_to_coco(c) for c in self.categories],
            "backbone": self.backbone,
            "config": self.config,
        }

    def _start(self, resume: bool) -> None:
        run_path = self.out_dir / RUN_FILE
        self._fresh = False  # set when this writer starts the run (abort then removes what it made)
        self._made_out = not self.out_dir.exists()
        for name in (RUN_FILE, MANIFEST_FILE):  # a write killed before its rename (the caller holds the lock)
            remove_atomic_temporaries(self.out_dir / name)
        if run_path.exists() and self._completed_nothing():
            # a run killed before its first shard: nothing to continue, nothing to lose (the caller
            # holds the folder's lock, so it is not live); start over, with or without --resume
            self._remove_leftovers()
        if not run_path.exists():
            if self.shard_dir.exists() and any(self.shard_dir.iterdir()):
                raise DatasetdmError(f"{self.shard_dir}: has files but {run_path} is missing; choose an empty output folder")
            others = sorted(p.name for p in self.out_dir.iterdir() if p.name != SHARD_DIR) if self.out_dir.is_dir() else []
            if others:  # an export, a checkpoint, a data set: never write shards into it
                raise DatasetdmError(f"{self.out_dir}: holds other files ({', '.join(others[:3])}) and no {RUN_FILE}; "
                                     f"it is not a generate run{' to resume' if resume else ''}: choose an empty or new output folder")
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            self._fresh = True
            write_json_atomic(run_path, self._run_info())
            return
        if not resume:
            raise DatasetdmError(f"{run_path}: output folder already holds a run; pass --resume to continue it or choose another folder")
        saved = read_run_info(self.out_dir)
        mine = self._run_info()
        different = [k for k in mine if saved.get(k) != mine[k]]
        if "config" in different:
            keys = sorted(k for k in set(saved["config"]) | set(self.config) if saved["config"].get(k) != self.config.get(k))
            raise DatasetdmError(f"{run_path}: cannot resume, the run was started with different settings: {', '.join(keys)}")
        if different:
            raise DatasetdmError(f"{run_path}: cannot resume, the run was started with different {', '.join(different)}")
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST_FILE).exists():
            table = read_manifest(self.out_dir)
            self._score_names = [c[len("score_"):] for c in table.column_names if c.startswith("score_")]
            self._rows = table.to_pylist()
            for r in self._rows:  # back to the in-memory shape: one scores dict per row
                r["scores"] = {n: r.pop(f"score_{n}") for n in self._score_names}
        ids = [r["id"] for r in self._rows]
        if ids != list(range(len(ids))):
            raise DatasetdmError(f"{self.out_dir / MANIFEST_FILE}: sample ids are not 0..{len(ids) - 1} in order; the manifest was edited")
        self._next_id = len(ids)
        self._remove_unlisted_shards()

    def _completed_nothing(self) -> bool:
        if (self.out_dir / MANIFEST_FILE).exists():
            return False
        shards = list(self.shard_dir.iterdir()) if self.shard_dir.is_dir() else []
        return all(p.name.startswith(".") and p.name.endswith(".tmp") for p in shards)

    def _remove_leftovers(self) -> None:
        """Remove what a run that completed nothing wrote: temporary shards, run.json, shards/ and
        the output folder itself when this writer made it and it is empty."""
        if self.shard_dir.is_dir():
            for p in self.shard_dir.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
            if not any(self.shard_dir.iterdir()):
                self.shard_dir.rmdir()
        (self.out_dir / RUN_FILE).unlink(missing_ok=True)
        if self._made_out and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()

    def _listed_shards(self) -> set[int]:
        return set(range((self._next_id + self.samples_per_shard - 1) // self.samples_per_shard))

    def _remove_unlisted_shards(self) -> None:
        listed = self._listed_shards()
        for p in self.shard_dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink()  # an interrupted shard
            elif p.name.startswith("shard-") and p.suffix == ".tar" and int(p.stem[len("shard-"):]) not in listed:
                p.unlink()  # renamed, but the manifest was not updated before the crash
        for k in listed:
            if not (self.shard_dir / shard_name(k)).exists():
                raise DatasetdmError(f"{self.shard_dir / shard_name(k)}: listed in the manifest but missing")

    def resume_from(self, n: int) -> int:
        """First sample id still to generate for a run of ``n`` ids.

        A final partial shard (a finished shorter run being extended) is reopened: it is removed
        with its manifest rows and regenerated, so shard k always holds ids [k*S, (k+1)*S).
        """
        if self._next_id >= n or self._next_id % self.samples_per_shard == 0:
            return self._next_id
        start = self._next_id - self._next_id % self.samples_per_shard
        self._rows = self._rows[:start]
        self._write_manifest()
        (self.shard_dir / shard_name(start // self.samples_per_shard)).unlink()
        self._next_id = start
        return start

    @property
    def next_id(self) -> int:
        return self._next_id

    # ---- writing --------------------------------------------------------------------------

    def add(
        self,
        sample_id: int,
        row: dict,
        sample: LabelledSample | None,
        extras: dict[str, LabelledSample] | None = None,
    ) -> None:
        """Record sample ``sample_id``; ``sample`` None when it was dropped.

        ``row``: ``prompt``, ``classes``, ``seed``, ``scores`` (name -> float or None) and, for a
        dropped sample, ``dropped_reason``. Everything in it but the reason also goes into the
        sample's JSON.
        """
        files = None if sample is None else encode_kept(sample_id, row, sample, self.categories, extras)
        self.add_files(sample_id, row, files)

    def add_files(self, sample_id: int, row: dict, files: dict[str, bytes] | None) -> None:
        """``add`` for a sample already encoded by ``encode_kept`` (None when it was dropped)."""
        if sample_id != self._next_id:
            raise DatasetdmError(f"{self.out_dir}: samples must be added in id order; expected {self._next_id}, got {sample_id}")
        index = sample_id // self.samples_per_shard
        if self._open is None:
            self._begin(index)
        kept = files is not None
        record = {
            "id": sample_id,
            "key": sample_key(sample_id),
            "shard": shard_name(index) if kept else None,
            "prompt": row["prompt"],
            "classes": list(row.get("classes") or []),
            "seed": int(row["seed"]),
            "kept": kept,
            "dropped_reason": None if kept else str(row.get("dropped_reason") or "dropped"),
            "backbone": self.backbone,
            "versions": self.versions,
            "scores": _scores(row),
        }
        for name in record["scores"]:
            if name not in self._score_names:
                self._score_names.append(name)
        if kept:
            with naming_path(self.shard_dir / shard_name(index)):
                self._open.tar.write({"__key__": record["key"], **files})
        self._open.rows.append(record)
        self._next_id += 1
        if self._next_id % self.samples_per_shard == 0:
            self._finish()  # complete now, not when the next shard begins: a crash loses less

    def _begin(self, index: int) -> None:
        tmp = self.shard_dir / f".{shard_name(index)}.tmp"
        with naming_path(self.shard_dir / shard_name(index)):
            file = open(tmp, "wb")
            try:
                self._open = _OpenShard(index, tmp, file, _tar_writer(file))
            except BaseException:
                file.close()
                raise

    def _finish(self) -> None:
        shard = self._open
        final = self.shard_dir / shard_name(shard.index)
        with naming_path(final):
            shard.tar.close()  # the end-of-archive blocks; the file stays open (the writer does not own it)
            shard.file.flush()
            os.fsync(shard.file.fileno())  # the data must be on disk before the rename makes it visible
            shard.file.close()
            os.replace(shard.tmp, final)
        rows = self._rows + shard.rows
        with naming_path(self.out_dir / MANIFEST_FILE):
            self._write_manifest(rows)
        self._rows = rows  # only now: abort() trusts _rows to be what the manifest on disk lists
        self._open = None

    def close(self) -> None:
        """Finish the open (last, possibly partial) shard."""
        if self._open is not None:
            self._finish()

    def abort(self) -> None:
        """Undo what is not complete: the open shard's temporary file, a shard renamed before its
        manifest rows were written; for a run this writer started that completed no shard, also
        run.json, shards/ and the output folder it made. A rerun then starts cleanly (or, after a
        completed shard, continues with --resume). Never raises: it runs while an error is raised."""
        if self._open is not None:
            with contextlib.suppress(OSError, tarfile.TarError, ValueError):
                self._open.tar.close()  # on a full disk closing fails too; the file goes anyway
            with contextlib.suppress(OSError, ValueError):
                self._open.file.close()
            with contextlib.suppress(OSError):
                self._open.tmp.unlink(missing_ok=True)
            self._open = None
        with contextlib.suppress(OSError):
            listed = {shard_name(k) for k in range((len(self._rows) + self.samples_per_shard - 1) // self.samples_per_shard)}
            for p in self.shard_dir.iterdir() if self.shard_dir.is_dir() else ():
                if p.name.startswith("shard-") and p.name not in listed:
                    p.unlink()
            if self._fresh and not self._rows and not (self.out_dir / MANIFEST_FILE).exists():
                self._remove_leftovers()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()

    def _write_manifest(self, rows: list[dict] | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self._rows if rows is None else rows
        columns = {name: [r.get(name) for r in rows] for name in BASE_COLUMNS}
        for name in self._score_names:
            columns[f"score_{name}"] = [r["scores"].get(name) for r in rows]
        schema = pa.schema(
            [
                ("id", pa.int64()),
                ("key", pa.string()),
                ("shard", pa.string()),
                ("prompt", pa.string()),
                ("classes", pa.list_(pa.string())),
                ("seed", pa.int64()),
                ("kept", pa.bool_()),
                ("dropped_reason", pa.string()),
                ("backbone", pa.string()),
                ("versions", pa.string()),
            ]
            + [(f"score_{name}", pa.float64()) for name in self._score_names],
            metadata={b"datasetdm": json.dumps(self._run_info()).encode()},
        )
        table = pa.table(columns, schema=schema)
        with atomic_path(self.out_dir / MANIFEST_FILE) as tmp:
            pq.write_table(table, tmp)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def read_run_info(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetdmError(f"{path}: missing; not a datasetdm shard folder") from None
    except (OSError, ValueError) as e:
        raise DatasetdmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DatasetdmError(f"{path}: not a datasetdm shard run file (format {FORMAT!r} expected)")
    if info.get("version") != FORMAT_VERSION:
        raise DatasetdmError(f"{path}: shard format version {info.get('version')!r}; this datasetdm reads {FORMAT_VERSION}")
    return info


def read_manifest(out_dir: str | os.PathLike):
    """The manifest as a ``pyarrow.Table`` (one row per sample id, kept or dropped)."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        raise DatasetdmError(f"{path}: missing; no shard is complete yet")
    try:
        return pq.read_table(path)
    except Exception as e:
        raise DatasetdmError(f"{path}: not a readable Parquet file ({e})") from None


def shard_categories(out_dir: str | os.PathLike) -> list[Category]:
    return [coco.category_from_coco(c) for c in read_run_info(out_dir)["categories"]]


def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """Complete shards listed in the manifest, in order (for ``webdataset.WebDataset``)."""
    s = read_run_info(out_dir)["samples_per_shard"]
    table = read_manifest(out_dir)
    n = table.num_rows
    return [Path(out_dir) / SHARD_DIR / shard_name(k) for k in range((n + s - 1) // s)]


def iter_shard_files(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of one tar shard, in order; a DatasetdmError naming
    the shard when it is not a tar or is cut short (a truncated copy, a full disk)."""
    try:
        tar = tarfile.open(path, "r:")  # shards are never compressed: one plain error, not one per codec
    except (OSError, tarfile.TarError) as e:
        raise DatasetdmError(f"{path}: not a readable tar shard ({e})") from None
    with tar:
        key, files = None, {}
        members = iter(tar)
        while True:
            try:
                member = next(members, None)
                if member is None:
                    break
                if not member.isfile():
                    continue
                data = tar.extractfile(member).read()
            except (OSError, EOFError, tarfile.TarError) as e:
                raise DatasetdmError(f"{path}: truncated or damaged tar shard ({e})") from None
            name = member.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if k != key and files:
                yield key, files
                files = {}
            key = k
            files[ext] = data
        # tarfile ends quietly where a cut falls on a member header; a complete tar ends with two
        # zero blocks, so a file shorter than that was cut (and its last sample may miss files)
        if os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise DatasetdmError(f"{path}: truncated or damaged tar shard (it ends without the end-of-archive blocks)")
        if files:
            yield key, files


def read_shards(out_dir: str | os.PathLike, with_extras: bool = False) -> Iterator:
    """Kept samples of a shard folder in id order: ``LabelledSample``s, or (sample, extras).

    Each shard must hold exactly the kept samples the manifest lists for it: a tar cut at a member
    boundary reads without a tar error, and would otherwise lose samples silently."""
    paths = shard_paths(out_dir)  # run.json first: a folder that is no run says so
    expected: dict[str, list[str]] = {}
    for row in read_manifest(out_dir).select(["key", "shard", "kept"]).to_pylist():
        if row["kept"]:
            expected.setdefault(row["shard"], []).append(row["key"])
    for path in paths:
        if not path.exists():
            raise DatasetdmError(f"{path}: listed in the manifest but missing")
        keys = []
        for key, files in iter_shard_files(path):
            keys.append(key)
            sample, extras = decode_sample(files, f"{path}:{key}")
            yield (sample, extras) if with_extras else sample
        want = expected.get(path.name, [])
        if keys != want:
            raise DatasetdmError(f"{path}: holds {len(keys)} samples but the manifest lists {len(want)} kept ones; "
                                 "the shard is truncated or damaged")


def is_shard_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_FILE).is_file() and (Path(path) / SHARD_DIR).is_dir()
