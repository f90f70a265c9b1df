"""What the P-Decoder reads: hypercolumn features, per-class cross-attention maps, the image.

Per-class, not per-token, attention maps (paper §3.3 "Text-Image Representation Fusion"): the
1×1 fusion conv needs a fixed number of input channels, but token positions move with the prompt
("a photo of a cat, dog" vs "a photo of a dog") and differ between tokenizers (CLIP BPE, MiniLM
WordPiece). So the decoder gets one map per class it knows, in a fixed order: the average over the
class name's tokens (a name split into several tokens is averaged, as supplementary §3.1 does for
text embeddings) and over its occurrences, rescaled to a spatial max of 1, zero when the prompt
does not name the class. The cache stores these K maps instead of all T token maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.backbone.tokens import class_token_maps


@dataclass
class DecoderInput:
    features: list[torch.Tensor]  # (B, C_i, h_i, w_i), highest resolution first
    class_attention: list[torch.Tensor]  # (B, K, h_i, w_i) per level, K = decoder classes (may be 0)
    image: torch.Tensor | None  # (B, 3, H, W) float in [0, 1]; also fixes the output size
    image_size: tuple[int, int]

    @property
    def batch_size(self) -> int:
        return self.features[0].shape[0]

    def to(self, device=None, dtype=None) -> "DecoderInput":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return DecoderInput(
            [mv(f) for f in self.features], [mv(a) for a in self.class_attention], mv(self.image), self.image_size
        )

    def select(self, index) -> "DecoderInput":
        return DecoderInput(
            [f[index] for f in self.features],
            [a[index] for a in self.class_attention],
            None if self.image is None else self.image[index],
            self.image_size,
        )

    @staticmethod
    def stack(items: Sequence["DecoderInput"]) -> "DecoderInput":
        cat = lambda ts: torch.cat(ts, 0)  # noqa: E731
        n = len(items[0].features)
        return DecoderInput(
            [cat([it.features[i] for it in items]) for i in range(n)],
            [cat([it.class_attention[i] for it in items]) for i in range(n)],
            None if items[0].image is None else cat([it.image for it in items]),
            items[0].image_size,
        )


def class_attention_maps(hc: Hypercolumns, class_tokens: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per-class cross-attention maps (B, K, h, w) per resolution from per-token maps (B, T, h, w):
    ``backbone.tokens.class_token_maps``, each map rescaled to a spatial max of 1.

    ``class_tokens[k]``: the token ids of class k's name as the backbone's tokenizer writes it
    inside a prompt (``backbone.tokens.name_token_ids``). Requires ``hc.input_ids``.
    """
    if class_tokens and hc.input_ids is None:
        raise ValueError("hypercolumns carry no input_ids: cannot locate class tokens")
    ids = hc.input_ids if class_tokens else [[]] * hc.batch_size
    # summed and rescaled in fp32 whatever the capture's dtype, then stored in it
    maps = class_token_maps([a.float() for a in hc.cross_attention], ids, [[list(seq)] for seq in class_tokens])
    out = []
    for m, a in zip(maps, hc.cross_attention):
        peak = m.flatten(2).amax(-1).clamp_min(1e-8)[..., None, None]
        out.append((m / peak).to(a.dtype))
    return out


def class_prompt(names: Sequence[str]) -> str:
    """The paper's training prompt (§3.3): "a photo of a [CLS]_1, [CLS]_2, ..."."""
    return "a photo of a " + ", ".join(names) if names else "a photo"


def hypercolumn_input(
    hc: Hypercolumns, class_tokens: Sequence[Sequence[int]], images: torch.Tensor | None, image_size
) -> DecoderInput:
    return DecoderInput(list(hc.features), class_attention_maps(hc, class_tokens), images, tuple(image_size))


RAW_PIXELS = "raw-pixels"  # DecoderConfig.features of the baseline decoder
RAW_STRIDES = (4, 8, 16, 32)


def raw_pixel_input(images: torch.Tensor, num_classes: int = 0, strides: Sequence[int] = RAW_STRIDES) -> DecoderInput:
    """The paper's raw-pixel baseline: the same decoder fed the image instead of hypercolumns.

    Each level is the image space-to-depth'ed (lossless pixel_unshuffle) to stride s, so the
    decoder gets the same four-level pyramid shape it gets from a UNet. No attention: zero maps.
    """
    B, _, H, W = images.shape
    feats = []
    for s in strides:
        if H % s or W % s:
            feats.append(F.adaptive_avg_pool2d(images, (max(H // s, 1), max(W // s, 1))))
        else:
            feats.append(F.pixel_unshuffle(images, s))
    att = [f.new_zeros(B, num_classes, *f.shape[-2:]) for f in feats]
    return DecoderInput(feats, att, images, (H, W))


def image_tensor(images) -> torch.Tensor:
    """uint8 (B,H,W,3) numpy/tensor or list of (H,W,3) → float (B,3,H,W) in [0,1]."""
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(np.array(i)) for i in images])  # copies: inputs may be read-only
    elif isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images))
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float() / 255.0
