"""The one place that touches transformers' Mask2Former internals (pinned: transformers>=5.0,<5.24).

`Mask2FormerMaskedAttentionDecoder`, `Mask2FormerHungarianMatcher` and the sine position embedding
are internal classes of transformers, not public API. Everything else in the decoder package goes
through the two wrappers below, so a transformers release that renames or reshapes them breaks
here and only here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mask2former.configuration_mask2former import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    Mask2FormerMaskedAttentionDecoder,
    Mask2FormerSinePositionEmbedding,
)

NUM_LEVELS = 3  # Mask2Former's masked-attention decoder cycles over exactly three feature levels


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder (paper §3.4: queries, masked cross-attention, self-attention,
    FFN) with the input projections, level embeddings and sine positions Mask2Former puts around it.

    Unlike transformers' ``Mask2FormerTransformerModule`` the queries come from the caller, because
    the open-vocabulary head builds them from class-name embeddings (paper eq. 4).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, layers: int):
        super().__init__()
        # decoder_layers counts the initial mask prediction too: `layers` transformer layers follow it.
        # dropout 0: transformers also uses config.dropout as *layer drop*, which would skip layers.
        self.config = Mask2FormerConfig(
            hidden_dim=dim,
            num_attention_heads=heads,
            dim_feedforward=ffn_dim,
            decoder_layers=layers + 1,
            mask_feature_size=dim,
            dropout=0.0,
            pre_norm=False,
            backbone_config=None,
            use_pretrained_backbone=False,
        )
        self.position = Mask2FormerSinePositionEmbedding(num_position_features=dim // 2, normalize=True)
        self.level_embed = nn.Embedding(NUM_LEVELS, dim)
        self.decoder = Mask2FormerMaskedAttentionDecoder(self.config)

    def forward(
        self, levels: list[torch.Tensor], mask_features: torch.Tensor, queries: torch.Tensor, query_pos: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """levels: three (B, dim, h, w) maps, lowest resolution first (Mask2Former's 1/32, 1/16, 1/8);
        mask_features: (B, dim, H, W); queries, query_pos: (B, Q, dim).

        Returns per decoder stage (the initial one plus each layer, for deep supervision):
        the layer-normed query states (B, Q, dim) and mask logits (B, Q, H, W).
        """
        assert len(levels) == NUM_LEVELS
        memory, pos, sizes = [], [], []
        for i, x in enumerate(levels):
            sizes.append(x.shape[-2:])
            pos.append(self.position(x.shape, x.device, x.dtype).flatten(2).permute(2, 0, 1))
            memory.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        out = self.decoder(
            inputs_embeds=queries.transpose(0, 1),
            multi_stage_positional_embeddings=pos,
            pixel_embeddings=mask_features,
            encoder_hidden_states=memory,
            query_position_embeddings=query_pos.transpose(0, 1),
            feature_size_list=sizes,
            return_dict=True,
        )
        states = [h.transpose(0, 1) for h in out.intermediate_hidden_states]
        return states, list(out.masks_queries_logits)


class HungarianMatcher:
    """Mask2Former's bipartite matching (class cost + sigmoid-CE + dice on sampled points).

    ``match(mask_logits (B,Q,H,W), class_logits (B,Q,K+1), targets)`` → per image (query idx, target idx).
    Targets are dicts with ``masks`` (N,H,W) float and ``labels`` (N,) long; images without targets
    get empty index tensors (transformers' matcher would fail on them).
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 1024):
        self.matcher = Mask2FormerHungarianMatcher(
            cost_class=cost_class, cost_mask=cost_mask, cost_dice=cost_dice, num_points=num_points
        )

    @torch.no_grad()
    def match(self, mask_logits, class_logits, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.long)
                out.append((empty, empty))
                continue
            (idx,) = self.matcher(
                mask_logits[b : b + 1].float(), class_logits[b : b + 1].float(), [t["masks"].float()], [t["labels"]]
            )
            out.append(idx)
        return out
