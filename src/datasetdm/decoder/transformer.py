"""Mask2Former's transformer decoder (Cheng et al. 2022, §3.2; DatasetDM §3.4), in plain torch.

Each layer: masked cross-attention (a query reads only the pixels its previous mask prediction
holds, sigmoid ≥ 0.5) → self-attention among the queries → FFN, each with a residual and a
post-LayerNorm. Layer ``i`` reads feature level ``i mod 3``, lowest resolution first. The mask of
every stage (the one before the first layer too) is predicted from the LayerNorm-ed query states
through a 3-layer MLP and a dot product with the per-pixel embeddings; all of them are returned
for deep supervision.

Decoders saved before this module (version-1 checkpoints) hold the same weights under the names of
transformers' internal Mask2Former classes; ``upgrade_legacy_keys`` renames them (and stacks the
separate q/k/v projections into ``nn.MultiheadAttention``'s one input projection).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

NUM_LEVELS = 3  # the decoder cycles over three feature levels (Mask2Former's 1/32, 1/16, 1/8)


def sine_positions(height: int, width: int, dim: int, device=None, dtype=torch.float32,
                   temperature: float = 10000.0) -> torch.Tensor:
    """(height·width, dim) fixed 2-D sine positions (DETR's): the first half encodes y, the second
    x, each as (sin, cos) pairs of the coordinate normalised to (0, 2π] at geometric frequencies."""
    half = dim // 2
    freqs = temperature ** (2 * torch.arange(half // 2, device=device).to(dtype) / half)
    eps = 1e-6  # as in DETR: the last row/column maps to just under 2π
    ys = torch.arange(1, height + 1, device=device, dtype=dtype) / (height + eps) * (2 * math.pi)
    xs = torch.arange(1, width + 1, device=device, dtype=dtype) / (width + eps) * (2 * math.pi)

    def encode(coord: torch.Tensor) -> torch.Tensor:  # (n,) → (n, half): sin(a0), cos(a0), sin(a1), …
        angles = coord[:, None] / freqs
        return torch.stack([angles.sin(), angles.cos()], -1).flatten(1)

    y = encode(ys)[:, None, :].expand(height, width, half)
    x = encode(xs)[None, :, :].expand(height, width, half)
    return torch.cat([y, x], -1).reshape(height * width, dim)


class MaskedAttentionLayer(nn.Module):
    """Masked cross-attention → self-attention → FFN (post-norm, no dropout: few-shot training)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.heads = heads
        # Initial weights are drawn as Mask2Former's reference layer draws them (self-attention's
        # k, v, q and output projections as plain Linear layers, then cross-attention, then the
        # FFN), so a seed gives the weights version-1 decoders started from: the decoder's
        # few-shot results (open-vocab unseen classes most of all) depend on the start.
        k, v, q, out = (nn.Linear(dim, dim) for _ in range(4))
        with torch.random.fork_rng(devices=[]):  # its own draws are replaced just below
            self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        with torch.no_grad():
            self.self_attn.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.self_attn.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            self.self_attn.out_proj.load_state_dict(out.state_dict())
        self.self_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, h, query_pos, memory, memory_pos, blocked):
        """h, query_pos: (B, Q, dim); memory, memory_pos: (B, HW, dim); blocked: (B·heads, Q, HW)
        bool, True where a query may not look."""
        attended, _ = self.cross_attn(h + query_pos, memory + memory_pos, memory, attn_mask=blocked,
                                      need_weights=False)
        h = self.cross_norm(h + attended)
        q = h + query_pos
        attended, _ = self.self_attn(q, q, h, need_weights=False)
        h = self.self_norm(h + attended)
        return self.ffn_norm(h + self.ffn(h))


class MaskedAttentionDecoder(nn.Module):
    """Queries in, per-stage query states and mask logits out; the queries come from the caller
    (learned embeddings, or the open-vocabulary head's class-name queries, paper eq. 4)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, layers: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.level_embed = nn.Embedding(NUM_LEVELS, dim)
        self.layers = nn.ModuleList(MaskedAttentionLayer(dim, heads, ffn_dim) for _ in range(layers))
        self.query_norm = nn.LayerNorm(dim)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                        nn.Linear(dim, dim))

    def predict_masks(self, h, mask_features, attention_size):
        """→ (LayerNorm-ed states (B, Q, dim), mask logits (B, Q, H, W), blocked (B·heads, Q, hw) at
        ``attention_size``: the mask the next layer's cross-attention obeys)."""
        states = self.query_norm(h)
        logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(states), mask_features)
        small = nn.functional.interpolate(logits, size=tuple(attention_size), mode="bilinear", align_corners=False)
        blocked = (small.sigmoid() < 0.5).flatten(2)  # (B, Q, hw); no gradient flows through a bool
        # a query whose mask is empty at this level would attend to nothing (a softmax over no
        # keys is NaN): it looks everywhere instead, as Mask2Former does
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return states, logits, blocked.repeat_interleave(self.heads, 0)

    def forward(self, levels: list[torch.Tensor], mask_features: torch.Tensor, queries: torch.Tensor,
                query_pos: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """levels: three (B, dim, h, w) maps, lowest resolution first; mask_features: (B, dim, H, W);
        queries, query_pos: (B, Q, dim). Returns per stage (before the first layer, then after
        each): the LayerNorm-ed query states (B, Q, dim) and the mask logits (B, Q, H, W)."""
        if len(levels) != NUM_LEVELS:
            raise ValueError(f"the masked-attention decoder reads {NUM_LEVELS} feature levels, got {len(levels)}")
        sizes = [tuple(x.shape[-2:]) for x in levels]
        memory = [x.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, x in enumerate(levels)]
        memory_pos = [sine_positions(*size, self.dim, x.device, x.dtype)[None] for size, x in zip(sizes, levels)]
        h = queries
        states, masks = [], []
        state, mask, blocked = self.predict_masks(h, mask_features, sizes[0])
        states.append(state)
        masks.append(mask)
        for i, layer in enumerate(self.layers):
            level = i % NUM_LEVELS
            h = layer(h, query_pos, memory[level], memory_pos[level], blocked)
            state, mask, blocked = self.predict_masks(h, mask_features, sizes[(i + 1) % NUM_LEVELS])
            states.append(state)
            masks.append(mask)
        return states, masks


# ----------------------------------------------------------------- version-1 checkpoints
_LEGACY = re.compile(r"^(?P<head>(?:.*\.)?transformer\.)decoder\.(?P<rest>.+)$")
_RENAMES = (
    (re.compile(r"^layernorm\.(weight|bias)$"), r"query_norm.\1"),
    (re.compile(r"^mask_predictor\.mask_embedder\.(\d)\.0\.(weight|bias)$"),
     lambda m: f"mask_embed.{2 * int(m.group(1))}.{m.group(2)}"),  # Linear i sits at Sequential index 2i
    (re.compile(r"^layers\.(\d+)\.cross_attn\.(.+)$"), r"layers.\1.cross_attn.\2"),
    (re.compile(r"^layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)$"), r"layers.\1.cross_norm.\2"),
    (re.compile(r"^layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$"), r"layers.\1.self_attn.out_proj.\2"),
    (re.compile(r"^layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$"), r"layers.\1.self_norm.\2"),
    (re.compile(r"^layers\.(\d+)\.fc1\.(weight|bias)$"), r"layers.\1.ffn.0.\2"),
    (re.compile(r"^layers\.(\d+)\.fc2\.(weight|bias)$"), r"layers.\1.ffn.2.\2"),
    (re.compile(r"^layers\.(\d+)\.final_layer_norm\.(weight|bias)$"), r"layers.\1.ffn_norm.\2"),
)
_QKV = re.compile(r"^layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def has_legacy_keys(state: dict) -> bool:
    return any(_LEGACY.match(k) for k in state)


def upgrade_legacy_keys(state: dict) -> dict:
    """A state dict written when this decoder was transformers' ``Mask2FormerMaskedAttentionDecoder``
    (keys ``….transformer.decoder.…``) → this module's keys; the same weights, the same function.
    Keys that are not the old decoder's pass through; an unknown old key raises KeyError."""
    out, qkv = {}, {}
    for key, value in state.items():
        m = _LEGACY.match(key)
        if m is None:
            out[key] = value
            continue
        head, rest = m.group("head"), m.group("rest")
        parts = _QKV.match(rest)
        if parts:  # transformers' self-attention keeps q, k, v apart; MultiheadAttention stacks them
            layer, which, kind = parts.groups()
            qkv.setdefault((head, layer, kind), {})[which] = value
            continue
        for pattern, replacement in _RENAMES:
            if pattern.match(rest):
                out[head + pattern.sub(replacement, rest)] = value
                break
        else:
            raise KeyError(f"{key}: not a weight of the Mask2Former decoder this version reads")
    for (head, layer, kind), tensors in qkv.items():
        if set(tensors) != {"q", "k", "v"}:
            raise KeyError(f"{head}decoder.layers.{layer}.self_attn: q, k and v projections incomplete")
        out[f"{head}layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat([tensors["q"], tensors["k"], tensors["v"]])
    return out
