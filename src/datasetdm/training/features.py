"""Where the decoder's inputs come from: a backbone's hypercolumns (VAE encode, noise to t = 1, one
UNet pass: paper §3.3) or raw pixels (the Table 6a baseline), computed once per view and cached
on disk, so training never runs the UNet per iteration.

The disk cache (``disk_inputs``) is a folder ``features-{key}/`` of safetensors shards, one per
extraction batch of views (features and attention maps fp16, the view's pixels uint8), each
written once through a temporary file and renamed, plus ``cache.json``. A build that is
interrupted continues with the shards that are missing; a complete one is reused by any run whose
key (backbone fingerprint and dtype, images, views, prompts, sizes) matches. Training reads a
batch's rows through a memory map opened for that read and closed after it, so resident memory
holds a batch, not the data set: at Stable Diffusion's 512 px a view's hypercolumns take about
5.5 MB, and 100 images × 16 views about 9 GB.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from datasetdm.backbone.tokens import name_token_ids, span_positions
from datasetdm.decoder.inputs import RAW_PIXELS, DecoderInput, image_tensor
from datasetdm.decoder.predictor import Predictor
from datasetdm.errors import DatasetdmError
from datasetdm.io import atomic_path
from datasetdm.training.views import view_noise_seeds

EMBEDDED = "embedded"  # the loader's printable source of the embedded backbone


# ------------------------------------------------------------------------------------ features


CACHE_DTYPE = torch.float16  # hypercolumn inputs as the cache stores them (and evaluate reads them)


class FeatureSource:
    """Turns images + prompts into ``DecoderInput``: hypercolumns of a backbone, or raw pixels
    (``decoder.predictor.Predictor``'s hypercolumn step, stored in ``CACHE_DTYPE``)."""

    def __init__(self, kind: str, categories: list[dict], backbone=None):
        self.kind = kind
        self.categories = categories
        self.backbone = backbone
        self._predictor = self.predictor()

    def predictor(self, decoders=None) -> Predictor:
        """A predictor whose decoders read inputs made exactly as this source makes the cache's."""
        return Predictor(None if self.kind == RAW_PIXELS else self.backbone, decoders, store_dtype=CACHE_DTYPE)

    @property
    def fingerprint(self) -> str:
        return RAW_PIXELS if self.kind == RAW_PIXELS else self.backbone.fingerprint

    @property
    def dtype(self) -> torch.dtype:
        """The precision the features are computed in (the backbone's; raw pixels: fp32)."""
        return torch.float32 if self.kind == RAW_PIXELS or self.backbone is None else self.backbone.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.backbone is None else self.backbone.device

    @property
    def description(self) -> dict:
        """What the checkpoint records; ``backbone_from_record`` turns ``source`` back into a backbone."""
        if self.kind == RAW_PIXELS:
            d = {"fingerprint": RAW_PIXELS, "source": RAW_PIXELS, "name": RAW_PIXELS}
            if self.backbone is not None:  # open-vocab: class names embedded by this backbone's text encoder
                d["text_encoder"] = self._source()
            return d
        return {"fingerprint": self.backbone.fingerprint, "source": self._source(), "name": self.backbone.name}

    def _source(self) -> str:
        src = str(self.backbone.source)  # "embedded", a folder as given, or a hub id
        folder = Path(src).expanduser()
        return str(folder.resolve()) if src != EMBEDDED and folder.exists() else src

    def train_size(self, sizes: set) -> tuple[int, int]:
        """One size for every view: the images' own when they share one the backbone accepts."""
        if self.kind == RAW_PIXELS:
            return max(sizes)
        m = self.backbone.size_multiple
        if len(sizes) == 1:
            (h, w), = sizes
            if h % m == 0 and w % m == 0:
                return h, w
        return self.backbone.native_size

    @torch.no_grad()
    def extract(self, images: list[np.ndarray], prompts: list[str], seeds: list[int], timestep: int = 1) -> DecoderInput:
        self._predictor.set_images(images, prompts, seeds, timestep=timestep)
        try:
            return self._predictor.inputs([c["name"] for c in self.categories])
        finally:
            self._predictor.reset()  # nothing of the batch is held past it

    @torch.no_grad()
    def text_embeddings(self, names: list[str]) -> torch.Tensor:
        """(K, D): each class name through the backbone's text encoder, averaged over the name's
        own tokens (supplementary §3.1: a name of several tokens is averaged into one)."""
        if self.backbone is None:
            raise DatasetdmError("open-vocab needs a backbone's text encoder for class names (--backbone)")
        out = []
        tok = self.backbone.tokenizer
        for name in names:
            states, ids = self.backbone.encode_prompt([name])
            (name_ids,) = name_token_ids(tok, [name])
            pos = span_positions(ids[0].tolist(), name_ids) or list(range(1, 1 + len(name_ids)))
            out.append(states[0, pos].float().mean(0).cpu())
        return torch.stack(out)


def backbone_from_record(source: str | None):
    """A checkpoint's recorded backbone source → what ``load_backbone`` takes (None: embedded)."""
    return None if source in (None, EMBEDDED, RAW_PIXELS) else source


def load_feature_source(kind: str, categories, backbone_source=None, need_text=False, device="cpu",
                        dtype=None) -> FeatureSource:
    """``device``/``dtype`` as ``load_backbone`` takes them (``auto``; fp16 on CUDA by default)."""
    if kind not in ("hypercolumns", RAW_PIXELS):
        raise DatasetdmError(f"--features must be 'hypercolumns' or '{RAW_PIXELS}', not {kind!r}")
    backbone = None
    if kind == "hypercolumns" or need_text:
        from datasetdm.backbone.loader import load_backbone

        backbone = load_backbone(backbone_source, device=device, dtype=dtype)
    return FeatureSource(kind, categories, backbone)


# -------------------------------------------------------------------------------------- cache


# pixels of one extraction batch: the VAE encoder's first activations are 128 channels at full
# resolution (at 512 px, 16 views would hold over 1 GB per activation in bf16, several alive at once),
# so large views go through in smaller batches; the world's 64 px views keep ``extract_batch`` (16)
EXTRACT_PIXELS = 8 * 256 * 256


def extract_batch_for(opts, n_pixels: int) -> int:
    """Views per extraction batch (and per cache shard) for views of ``n_pixels`` pixels."""
    return max(1, min(int(opts.extract_batch), EXTRACT_PIXELS // max(1, int(n_pixels))))


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_inputs(views, prompts: list[str], source: FeatureSource, opts, cache_file: Path | None, progress=None):
    """DecoderInput for every view (view i read with ``prompts[i]``), all in RAM: computed once
    (batched as ``disk_inputs`` batches them) or read back from the single file ``cache_file``.
    ``train --feature-cache memory`` and the benches that time the cache itself use it."""
    if cache_file is not None and cache_file.exists():
        try:
            t = load_file(cache_file)
            n = sum(1 for k in t if k.startswith("f"))
            if t["f0"].shape[0] != len(views):
                raise ValueError("cache holds other views")
            img = image_tensor([v.image for v in views])
            return DecoderInput([t[f"f{i}"] for i in range(n)], [t[f"a{i}"] for i in range(n)], img, tuple(img.shape[-2:]))
        except Exception:
            cache_file.unlink(missing_ok=True)  # stale or truncated: recompute
    parts = []
    task = progress.add_task("hypercolumns", total=len(views)) if progress else None
    seeds = view_noise_seeds(opts, len(views))
    step = extract_batch_for(opts, views[0].image.shape[0] * views[0].image.shape[1])
    for b in range(0, len(views), step):
        chunk = views[b : b + step]
        parts.append(source.extract([v.image for v in chunk], prompts[b : b + len(chunk)], seeds[b : b + len(chunk)]))
        if progress:
            progress.advance(task, len(chunk))
    inp = DecoderInput.stack(parts)
    if cache_file is not None:
        tensors = {f"f{i}": f.contiguous() for i, f in enumerate(inp.features)}
        tensors.update({f"a{i}": a.contiguous() for i, a in enumerate(inp.class_attention)})
        with atomic_path(cache_file) as tmp:
            save_file(tensors, tmp)
    return inp


# --------------------------------------------------------------------------------- disk cache

CACHE_FORMAT = 1
CACHE_META = "cache.json"
IMAGE_KEY = "img"  # the view's pixels, uint8 (B, H, W, 3): the store gives whole DecoderInputs
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "U8": np.uint8, "F64": np.float64}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@dataclass
class _Shard:
    path: Path
    rows: int
    entries: dict  # key -> (numpy dtype, shape, absolute byte offset)


def _read_header(path: Path) -> dict:
    """Tensor name -> (dtype, shape, byte offset in the file) from a safetensors header; a
    ValueError when the file is not a complete safetensors file (a pickle, a truncated copy)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size or n > 1 << 24:
            raise ValueError("not a safetensors header")
        meta = json.loads(fh.read(n))
    entries = {}
    for key, v in meta.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(v.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {key}: dtype {v.get('dtype')} not written by this cache")
        shape = tuple(int(d) for d in v["shape"])
        begin, end = (int(o) for o in v["data_offsets"])
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize or 8 + n + end > size:
            raise ValueError(f"tensor {key}: truncated")
        entries[key] = (dtype, shape, 8 + n + begin)
    return entries


def _valid_shard(path: Path, rows: int) -> dict | None:
    """The shard's entries when it holds ``rows`` views of every tensor the cache writes, else None."""
    try:
        entries = _read_header(path)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    levels = sum(1 for k in entries if k.startswith("f"))
    want = {IMAGE_KEY} | {f"f{i}" for i in range(levels)} | {f"a{i}" for i in range(levels)}
    if levels == 0 or set(entries) != want or any(shape[0] != rows for _, shape, _ in entries.values()):
        return None
    return entries


class DiskFeatures:
    """The cached inputs of every view, on disk; ``select(index)`` reads one batch as a DecoderInput.

    Each read maps the shards it needs, copies the rows out and unmaps them again: the pages of a
    mapping count as resident memory while it is open, so a store kept mapped would grow towards
    the whole cache over an epoch."""

    def __init__(self, folder: Path, shards: list[_Shard], shard_size: int):
        self.folder, self.shards, self.shard_size = folder, shards, shard_size
        self.levels = sum(1 for k in shards[0].entries if k.startswith("f"))
        _, shape, _ = shards[0].entries[IMAGE_KEY]
        self.image_size = (int(shape[1]), int(shape[2]))

    def __len__(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def batch_size(self) -> int:  # DecoderInput's name for the number of rows
        return len(self)

    def select(self, index) -> DecoderInput:
        idx = [int(i) for i in torch.as_tensor(index).reshape(-1).tolist()]
        n = len(self)
        if any(not 0 <= i < n for i in idx):
            raise IndexError(f"view index out of range for a cache of {n} views")
        rows: dict[str, list] = {k: [None] * len(idx) for k in self.shards[0].entries}
        wanted = defaultdict(list)
        for pos, i in enumerate(idx):
            wanted[i // self.shard_size].append((pos, i % self.shard_size))
        for k, items in wanted.items():
            shard = self.shards[k]
            local = [r for _, r in items]
            mapped = np.memmap(shard.path, dtype=np.uint8, mode="r")
            try:
                for key, (dtype, shape, offset) in shard.entries.items():
                    block = np.ndarray(shape, dtype=dtype, buffer=mapped, offset=offset)[local]  # a copy
                    for (pos, _), row in zip(items, block):
                        rows[key][pos] = row
            finally:
                del mapped  # unmapped: nothing of the shard stays resident
        stack = lambda key: torch.from_numpy(np.stack(rows[key]))  # noqa: E731
        return DecoderInput([stack(f"f{i}") for i in range(self.levels)], [stack(f"a{i}") for i in range(self.levels)],
                            image_tensor(np.stack(rows[IMAGE_KEY])), self.image_size)


def _read_meta(folder: Path, key: str, n: int) -> dict | None:
    try:
        meta = json.loads((folder / CACHE_META).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT and meta.get("key") == key
          and meta.get("views") == n and isinstance(meta.get("shard_size"), int) and meta["shard_size"] >= 1)
    return meta if ok else None


def disk_inputs(views, prompts: list[str], source: FeatureSource, opts, folder: Path, key: str,
                progress=None) -> DiskFeatures:
    """The inputs of every view (view i read with ``prompts[i]``) in the cache folder ``folder``:
    shards already there are kept, missing ones computed (``extract_batch_for`` views each, the
    same batches as the in-memory cache, so the features are the same to the bit)."""
    from datasetdm.io import write_json_atomic

    n = len(views)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".shard-*.tmp"):  # a killed build's half-written shard
        tmp.unlink(missing_ok=True)
    meta = _read_meta(folder, key, n)
    if meta is None:  # new (or foreign): the shard size is fixed here, so a resume cuts the same shards
        first = views[0].image
        meta = {"format": CACHE_FORMAT, "key": key, "views": n,
                "shard_size": extract_batch_for(opts, first.shape[0] * first.shape[1]),
                "complete": False}
        write_json_atomic(folder / CACHE_META, meta)
    size = meta["shard_size"]
    count = -(-n // size)
    seeds = view_noise_seeds(opts, n)
    found = []
    for k in range(count):
        rows = min(size, n - k * size)
        found.append(_valid_shard(folder / shard_name(k), rows))
    done = sum(min(size, n - k * size) for k, e in enumerate(found) if e is not None)
    task = progress.add_task("hypercolumns", total=n, completed=done) if progress and done < n else None
    shards = []
    for k, entries in enumerate(found):
        rows = min(size, n - k * size)
        path = folder / shard_name(k)
        if entries is None:
            chunk = [views[i] for i in range(k * size, k * size + rows)]
            inp = source.extract([v.image for v in chunk], prompts[k * size : k * size + rows],
                                 seeds[k * size : k * size + rows])
            tensors = {f"f{i}": f.contiguous() for i, f in enumerate(inp.features)}
            tensors.update({f"a{i}": a.contiguous() for i, a in enumerate(inp.class_attention)})
            tensors[IMAGE_KEY] = torch.from_numpy(np.stack([np.asarray(v.image, dtype=np.uint8) for v in chunk]))
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
            entries = _valid_shard(path, rows)
            if entries is None:
                raise DatasetdmError(f"{path}: the feature shard just written does not read back")
            if task is not None:
                progress.advance(task, rows)
        shards.append(_Shard(path, rows, entries))
    if not meta.get("complete"):
        write_json_atomic(folder / CACHE_META, {**meta, "complete": True, "bytes": sum(
            os.path.getsize(s.path) for s in shards)})
    return DiskFeatures(folder, shards, size)
