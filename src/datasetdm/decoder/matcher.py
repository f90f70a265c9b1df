"""Bipartite matching of predicted masks to target masks (Mask2Former §3 / DatasetDM §3.4).

The cost of giving query q the target n is ``w_class·(−p_q(class_n)) + w_mask·BCE + w_dice·dice``,
the mask terms on the same ``num_points`` random points of both masks (Mask2Former's point
sampling: the cost matrix then costs Q·N·points instead of Q·N·H·W). scipy's
``linear_sum_assignment`` finds the assignment of least total cost.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def assign(cost: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-cost one-to-one assignment of the rows of a (Q, N) cost to its columns: min(Q, N)
    pairs (row indices ascending). NaN and ±inf count as the largest finite cost, so a broken
    entry is only chosen when nothing else is left (scipy refuses them outright)."""
    cost = torch.as_tensor(cost).detach().float().cpu()
    big = torch.finfo(cost.dtype).max
    rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def sample_points(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps read bilinearly at (P, 2) points in [0, 1]² (x, y) → (N, P)."""
    grid = (2 * points - 1)[None, :, None, :].expand(masks.shape[0], -1, -1, -1)  # (N, P, 1, 2)
    return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0, :, 0]


def match_cost(mask_logits: torch.Tensor, class_logits: torch.Tensor, target_masks: torch.Tensor,
               target_labels: torch.Tensor, points: torch.Tensor, w_class: float, w_mask: float,
               w_dice: float) -> torch.Tensor:
    """(Q, N) matching cost of one image: mask_logits (Q, H, W), class_logits (Q, K+1),
    target_masks (N, H', W') in {0, 1}, target_labels (N,), points (P, 2)."""
    cost_class = -class_logits.softmax(-1)[:, target_labels]
    pred = sample_points(mask_logits, points)  # (Q, P) logits
    tgt = sample_points(target_masks.to(pred), points)  # (N, P)
    n_points = pred.shape[1]
    # BCE of every pred against every target, summed as (cost if 1)·t + (cost if 0)·(1 − t)
    if_one = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    if_zero = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    cost_bce = (if_one / n_points) @ tgt.T + (if_zero / n_points) @ (1 - tgt).T
    prob = pred.sigmoid()
    cost_dice = 1 - (2 * prob @ tgt.T + 1) / (prob.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
    return w_mask * cost_bce + w_class * cost_class + w_dice * cost_dice


class HungarianMatcher:
    """``match(mask_logits (B,Q,H,W), class_logits (B,Q,K+1), targets)`` → per image (query idx,
    target idx). Targets are dicts with ``masks`` (N,H,W) and ``labels`` (N,) long; an image
    without targets gets empty index tensors.

    The points are drawn from torch's global generator, one draw of ``num_points`` per image that
    has targets (the trainer seeds it per step, so a resumed run matches like an unbroken one)."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 1024):
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.w_class, self.w_mask, self.w_dice, self.num_points = cost_class, cost_mask, cost_dice, num_points

    @torch.no_grad()
    def match(self, mask_logits, class_logits, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.long)
                out.append((empty, empty))
                continue
            points = torch.rand(self.num_points, 2, device=mask_logits.device)
            cost = match_cost(mask_logits[b].float(), class_logits[b].float(), t["masks"].float(), t["labels"],
                              points, self.w_class, self.w_mask, self.w_dice)
            out.append(assign(cost))
        return out
