"""What one UNet pass yields for the decoders and labelers (paper §3.3, "hypercolumns")."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Hypercolumns:
    """Multi-scale UNet features and attention maps for a batch.

    ``features[i]`` and ``cross_attention[i]`` share a resolution; index 0 is the highest. One
    entry per UNet resolution: four for SD 1.x/2.x (at 512 px: 64, 32, 16, 8 latent px), three
    for SDXL (at 1024 px: 128, 64, 32; its 128 level has no attention layers, so its maps are the
    64 level's, upsampled).
    """

    features: list[torch.Tensor]  # each (B, C_i, H_i, W_i)
    # each (B, T, H_i, W_i): softmax over the T prompt tokens (sums to 1 over T),
    # averaged over the layers and heads at that resolution; conditional branch only under CFG.
    cross_attention: list[torch.Tensor]
    # side -> (B, side*side, side*side), rows sum to 1; only resolutions that were requested.
    self_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None  # (B, T) the tokens the cross-attention refers to
    prompts: list[str] = field(default_factory=list)
    timestep: int | None = None
    # optional side branch (training-free labels): each (B, Tc, H_i, W_i), the image queries'
    # attention to the class-prompt tokens (softmax over Tc, sums to 1), averaged like
    # ``cross_attention``; None unless ``class_prompt_embeds`` was passed to the capture.
    class_attention: list[torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.features[0].shape[0]

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return [tuple(f.shape[-2:]) for f in self.features]

    def to(self, device=None, dtype=None) -> "Hypercolumns":
        def mv(t):
            return t.to(device=device, dtype=dtype) if t is not None and t.is_floating_point() else (
                t.to(device=device) if t is not None else None
            )

        return Hypercolumns(
            features=[mv(f) for f in self.features],
            cross_attention=[mv(a) for a in self.cross_attention],
            self_attention={k: mv(v) for k, v in self.self_attention.items()},
            input_ids=mv(self.input_ids),
            prompts=list(self.prompts),
            timestep=self.timestep,
            class_attention=None if self.class_attention is None else [mv(a) for a in self.class_attention],
        )

    def select(self, index) -> "Hypercolumns":
        """A sub-batch (index: int, slice or index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        prompts = self.prompts
        if prompts:
            idx = range(len(prompts))[index] if isinstance(index, slice) else [int(i) for i in index]
            prompts = [self.prompts[i] for i in idx]
        return Hypercolumns(
            features=[f[index] for f in self.features],
            cross_attention=[a[index] for a in self.cross_attention],
            self_attention={k: v[index] for k, v in self.self_attention.items()},
            input_ids=None if self.input_ids is None else self.input_ids[index],
            prompts=prompts,
            timestep=self.timestep,
            class_attention=None if self.class_attention is None else [a[index] for a in self.class_attention],
        )
