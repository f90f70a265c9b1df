"""Where the decoder's inputs come from: a backbone's hypercolumns (VAE encode, noise to t = 1, one
UNet pass: paper §3.3) or raw pixels (the Table 6a baseline), computed once per view and cached
on disk, so training never runs the UNet per iteration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from datasetdm.backbone.tokens import name_token_ids, span_positions
from datasetdm.decoder.inputs import (
    RAW_PIXELS,
    DecoderInput,
    class_attention_maps,
    image_tensor,
    raw_pixel_input,
)
from datasetdm.errors import DatasetdmError
from datasetdm.io import atomic_path
from datasetdm.training.views import view_noise_seeds

EMBEDDED = "embedded"  # the loader's printable source of the embedded backbone


# ------------------------------------------------------------------------------------ features


class FeatureSource:
    """Turns images + prompts into ``DecoderInput``: hypercolumns of a backbone, or raw pixels."""

    def __init__(self, kind: str, categories: list[dict], backbone=None):
        self.kind = kind
        self.categories = categories
        self.backbone = backbone
        self.class_tokens = None
        if backbone is not None:
            tok = backbone.tokenizer
            self.class_tokens = name_token_ids(tok, [c["name"] for c in categories])

    @property
    def fingerprint(self) -> str:
        return RAW_PIXELS if self.kind == RAW_PIXELS else self.backbone.fingerprint

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
        img = image_tensor(images)
        if self.kind == RAW_PIXELS:
            return raw_pixel_input(img, len(self.categories))
        from datasetdm.backbone.capture import capture_real

        H, W = img.shape[-2:]
        hc = capture_real(self.backbone, list(img), prompts, t=timestep, seeds=seeds, size=(H, W))
        att = class_attention_maps(hc, self.class_tokens)
        feats = [f.float().cpu().half() for f in hc.features]
        return DecoderInput(feats, [a.float().cpu().half() for a in att], img, (H, W))

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


def load_feature_source(kind: str, categories, backbone_source=None, need_text=False, device="cpu") -> FeatureSource:
    if kind not in ("hypercolumns", RAW_PIXELS):
        raise DatasetdmError(f"--features must be 'hypercolumns' or '{RAW_PIXELS}', not {kind!r}")
    backbone = None
    if kind == "hypercolumns" or need_text:
        from datasetdm.backbone.loader import load_backbone

        backbone = load_backbone(backbone_source, device=device)
    return FeatureSource(kind, categories, backbone)


# -------------------------------------------------------------------------------------- cache


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_inputs(views, prompts: list[str], source: FeatureSource, opts, cache_file: Path | None, progress=None):
    """DecoderInput for every view (view i read with ``prompts[i]``), computed once (batched) or
    read back from ``cache_file``."""
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
    for b in range(0, len(views), opts.extract_batch):
        chunk = views[b : b + opts.extract_batch]
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
