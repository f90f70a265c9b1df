"""The P-Decoder (paper §3.4, Fig. 3) and its builders.

One architecture for every task, "with only minor variations (whether to start up some layers)":
fusion → pixel decoder → (transformer decoder, for mask tasks) → head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from datasetdm.decoder.heads import HEADS, TASKS
from datasetdm.decoder.inputs import DecoderInput
from datasetdm.decoder.modules import Fusion, PixelDecoder, image_stages


@dataclass
class DecoderConfig:
    task: str
    categories: list[dict]  # [{"id", "name", "keypoints"?}], the labelled folder's, in order
    feature_channels: list[int]  # per level, highest resolution first
    feature_sizes: list[list[int]]  # (h, w) per level
    image_size: list[int]  # (H, W) of the decoder's output
    features: str = "hypercolumns"  # or "raw-pixels" (the paper's baseline)
    attention: bool = True  # fuse per-class cross-attention maps (paper §3.3)
    use_image: bool = True  # image path in the pixel decoder (see modules.py)
    dim: int = 64
    num_queries: int = 16
    layers: int = 3  # transformer decoder layers, one per level (Mask2Former: 9)
    heads: int = 4
    ffn_dim: int = 256
    text_dim: int = 0  # open-vocab: width of the text encoder's embeddings
    held_out: list[str] = field(default_factory=list)  # open-vocab: class names kept out of training
    backbone: dict = field(default_factory=dict)  # {"fingerprint", "source", "name"}
    timestep: int = 1  # paper §3.3: t = 1
    prompt: str = "template"  # how prompts were built for training (see training.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def attention_channels(self) -> int:
        if not self.attention:
            return 0
        # open-vocab: the set of classes varies per call, so one class-agnostic map (the max
        # over the named classes); closed vocabularies: one map per class
        return 1 if self.task == "open-vocab" else len(self.categories)


class PDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.task not in HEADS:
            raise ValueError(f"unknown task {cfg.task!r}; one of {TASKS}")
        self.cfg = cfg
        self.fusion = Fusion(cfg.feature_channels, cfg.attention_channels, cfg.dim)
        stages = image_stages(tuple(cfg.feature_sizes[0]), tuple(cfg.image_size)) if cfg.use_image else 0
        self.pixel_decoder = PixelDecoder(len(cfg.feature_channels), cfg.dim, stages)
        self.head = HEADS[cfg.task](cfg)

    def _attention(self, inp: DecoderInput, class_index=None) -> list[torch.Tensor]:
        if not self.cfg.attention:
            return []
        if self.cfg.task == "open-vocab":
            att = [a if class_index is None else a[:, class_index] for a in inp.class_attention]
            return [a.amax(1, keepdim=True) if a.shape[1] else a.new_zeros(a.shape[0], 1, *a.shape[-2:]) for a in att]
        return inp.class_attention

    def forward(self, inp: DecoderInput, **kw) -> dict:
        fused = self.fusion(inp.features, self._attention(inp, kw.get("class_index")))
        levels, pixel_embed = self.pixel_decoder(fused, inp.image if self.cfg.use_image else None)
        return self.head(levels, pixel_embed, inp, **kw)

    def loss(self, out: dict, targets: list[dict]):
        return self.head.loss(out, targets)

    def targets(self, sample, **kw) -> dict:
        return self.head.targets(sample, **kw)

    @torch.no_grad()
    def predict(self, inp: DecoderInput, **kw) -> list[dict]:
        was = self.training
        self.eval()
        try:
            return self.head.predict(self(inp, **kw), **kw)
        finally:
            self.train(was)


# segment-anything style: a small dict of builders, one per task, all returning a PDecoder
BUILDERS = {task: PDecoder for task in TASKS}


def build_decoder(cfg: DecoderConfig) -> PDecoder:
    return BUILDERS[cfg.task](cfg)
