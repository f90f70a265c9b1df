"""Training-free semantic labels from the model's own attention (Dataset Diffusion, Nguyen et al.
NeurIPS 2023, §3). No labelled images are needed.

For a prompt S naming classes c_1..c_K:

1. *Class-prompt appending*: the image is generated from "S; c_1 c_2 … c_K", so every class is
   named explicitly even when S says "two people" or "a sofa".
2. *Class-prompt cross-attention*: the image queries also attend, in a side branch that does not
   change the image, to the class prompt "c_1 c_2 … c_K" encoded on its own
   (``Hypercolumns.class_attention``); each class's map is the mean over its tokens (a name of
   several BPE/WordPiece tokens is averaged), over heads and layers, then over the chosen
   resolutions after upsampling to the self-attention side.
3. *Self-attention exponentiation*: the maps are propagated by the aggregated self-attention
   raised to a power τ (default 4): A ← S^τ A, which spreads each class over the pixels that
   attend to one another (whole objects) instead of the few most text-like pixels.
4. Each class map is min-max normalised to [0, 1]; a pixel takes the class of its largest value
   when that value is ≥ 0.6, is uncertain (255, ignored in training) for 0.5–0.6, and background
   below (the reference implementation's defaults).

Only the attention it reads is captured: self-attention at one side, class-prompt attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasetdm.backbone.tokens import position_weights, token_positions, weighted_token_maps
from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import IGNORE_INDEX, Category, LabelledSample
from datasetdm.prompts.base import Prompt, append_class_names, classes_in_text


@dataclass(frozen=True)
class AttentionLabelerConfig:
    tau: int = 4  # self-attention exponent
    label_threshold: float = 0.6  # normalised attention at or above: the class
    ignore_threshold: float = 0.5  # from here up to label_threshold: uncertain (255)
    # latent side of the self-attention used for exponentiation; None: the highest resolution
    # that has attention layers
    self_attention_side: int | None = None
    # cross-attention resolutions averaged, as latent sides; None: every resolution from half the
    # self-attention side up to it (for SD at 512: 64 and 32; SDXL at 1024: 64 and 32, its 128
    # level has no attention layers; for the embedded backbone: 16 and 8)
    cross_attention_sides: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.tau < 0:
            raise ValueError(f"tau={self.tau}: must be ≥ 0")
        if not 0 <= self.ignore_threshold <= self.label_threshold <= 1:
            raise ValueError(
                f"thresholds: need 0 ≤ ignore_threshold ({self.ignore_threshold}) ≤ label_threshold "
                f"({self.label_threshold}) ≤ 1"
            )


def appended_prompt(text: str, classes: Sequence[str]) -> str:
    """Class-prompt appending: "a dog on a sofa" -> "a dog on a sofa; dog sofa" (not twice: a
    caption prompt from a labelled folder arrives appended already)."""
    return append_class_names(text, classes)


def class_prompt(classes: Sequence[str]) -> str:
    return " ".join(classes)


def attention_side(unet) -> int:
    """The highest-resolution latent side that has attention layers."""
    from datasetdm.backbone.capture import attention_level

    levels = len(unet.config.down_block_types)
    found = [attention_level(name, levels) for name, m in unet.named_modules() if name.endswith("attn1")]
    found = [lvl for lvl in found if lvl is not None]
    if not found:
        raise DatasetdmError("this UNet has no attention layers; the attention labeler needs them")
    s = unet.config.sample_size
    side = s if isinstance(s, int) else s[0]
    return side // 2 ** min(found)


class AttentionLabeler:
    """Generates with class-prompt appending and labels from the captured attention.

    ``generate_fn`` and ``annotator`` plug into ``datasetdm.generation.generate_dataset``.
    """

    def __init__(self, backbone, categories: Sequence[Category], config: AttentionLabelerConfig | None = None):
        self.backbone = backbone
        self.categories = [c for c in categories if c.id != 0]
        if not self.categories:
            raise DatasetdmError("the attention labeler needs at least one class")
        self.names = [c.name for c in self.categories]
        self.config = config or AttentionLabelerConfig()
        self.side = self.config.self_attention_side or attention_side(backbone.unet)

    # ------------------------------------------------------------------ generation
    def classes_of(self, text: str) -> tuple[str, ...]:
        """The run's classes named in a prompt (what gets appended and labelled)."""
        return classes_in_text(text, self.names)

    def read_prompt(self, text: str):
        """What the model reads of the prompt it generates from (the prompt with its classes
        appended): a class named only past the token limit was never read, and is not labelled."""
        from datasetdm.backbone.tokens import fit_prompt

        return fit_prompt(self.backbone.tokenizer, appended_prompt(text, self.classes_of(text)), self.backbone.max_tokens)

    def generate_fn(self, num_inference_steps: int = 50, guidance_scale: float = 7.5):
        from datasetdm.backbone.capture import generate

        def run(texts: list[str], seeds: list[int]):
            classes = [self.classes_of(t) for t in texts]
            class_embeds, _ = self.backbone.encode_prompt([class_prompt(c) for c in classes])
            return generate(
                self.backbone, [appended_prompt(t, c) for t, c in zip(texts, classes)], seeds,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                self_attention_res=(self.side,), class_prompt_embeds=class_embeds,
            )

        return run

    # ------------------------------------------------------------------ labels
    def class_maps(self, hc, classes: list[tuple[str, ...]]) -> list[torch.Tensor]:
        """Per sample, (K_i, side, side) class maps after averaging and exponentiation."""
        if hc.class_attention is None:
            raise DatasetdmError("hypercolumns have no class-prompt attention; generate with AttentionLabeler.generate_fn")
        if self.side not in hc.self_attention:
            raise DatasetdmError(f"hypercolumns have no {self.side}x{self.side} self-attention")
        # finer than the self-attention side (the finest with attention layers) is only an
        # upsampled copy of a coarser map (SDXL's highest resolution), so it is left out
        sides = self.config.cross_attention_sides or tuple(
            a.shape[-1] for a in hc.class_attention if a.shape[-1] * 2 >= self.side >= a.shape[-1]
        )
        levels = [a for a in hc.class_attention if a.shape[-1] in sides]
        if not levels:
            raise DatasetdmError(f"no class attention at sides {sides}; have {[a.shape[-1] for a in hc.class_attention]}")
        # (B, Tc, side, side): each resolution upsampled, then averaged
        cross = torch.stack([
            F.interpolate(a.float(), size=(self.side, self.side), mode="bilinear", align_corners=False) for a in levels
        ]).mean(0)
        self_attn = hc.self_attention[self.side].float()
        propagate = torch.linalg.matrix_power(self_attn, self.config.tau) if self.config.tau != 1 else self_attn
        out = []
        for i, names in enumerate(classes):
            if not names:
                out.append(cross.new_zeros((0, self.side, self.side)))
                continue
            prompt = class_prompt(names)
            positions = [token_positions(self.backbone.tokenizer, prompt, name, cross.shape[1]) for name in names]
            maps = weighted_token_maps(cross[i : i + 1], position_weights([positions], cross.shape[1]))[0]  # (K, side, side)
            flat = propagate[i] @ maps.flatten(1).T  # (hw, K): A <- S^tau A
            out.append(flat.T.reshape(len(names), self.side, self.side))
        return out

    def labels(self, maps: torch.Tensor, names: Sequence[str], size: tuple[int, int]) -> tuple[np.ndarray, float]:
        """Semantic map (H, W) uint8 with 255 in the uncertainty band, and the certain fraction."""
        h, w = size
        if maps.shape[0] == 0:
            return np.zeros((h, w), np.uint8), 1.0
        lo = maps.flatten(1).min(1).values[:, None, None]
        hi = maps.flatten(1).max(1).values[:, None, None]
        norm = (maps - lo) / (hi - lo).clamp_min(1e-12)
        norm = F.interpolate(norm[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        value, index = norm.max(0)
        ids = torch.tensor([self._id(n) for n in names], dtype=torch.uint8)
        semantic = torch.zeros((h, w), dtype=torch.uint8)
        certain = value >= self.config.label_threshold
        semantic[certain] = ids[index[certain]]
        uncertain = (value >= self.config.ignore_threshold) & ~certain
        semantic[uncertain] = IGNORE_INDEX
        return semantic.numpy(), float(1.0 - uncertain.float().mean())

    def _id(self, name: str) -> int:
        return next(c.id for c in self.categories if c.name == name)

    def annotate(self, images: np.ndarray, hc, prompts: list[Prompt]) -> list[LabelledSample]:
        texts = [p.text if isinstance(p, Prompt) else str(p) for p in prompts]
        classes = [self.classes_of(t) for t in texts]
        maps = self.class_maps(hc, classes)
        out = []
        for image, m, names in zip(images, maps, classes):
            semantic, certain = self.labels(m, names, image.shape[:2])
            out.append(LabelledSample(id="", image=image, semantic=semantic, meta={"confidence": certain}))
        return out

    @property
    def annotator(self):
        return self.annotate
