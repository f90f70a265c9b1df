"""Losses of the P-Decoder heads (paper §3.4).

Masks: Hungarian matching (`matcher.HungarianMatcher`: Mask2Former's cost, scipy's assignment), then
sigmoid BCE + dice on matched masks and cross-entropy on classes with a down-weighted "no object".
Mask losses are dense by default, with a validity map: at 64×64 px the full mask is cheaper than
12k sampled points. At Stable Diffusion's sizes (``DecoderConfig.point_loss_points``) they are
computed on sampled points instead (``point_mask_losses``, Mask2Former §3.2/§4 after PointRend), the
validity map sampled at the same points, so the semantic ignore value (255) is honoured there too.
Depth: scale-invariant log loss (Eigen et al.; the SigLoss DepthFormer uses).
Pose: MSE against Gaussian heatmaps with σ = 1 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datasetdm.decoder.matcher import HungarianMatcher


def resize_logits(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def masked_bce_dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask BCE (mean over valid pixels) and dice, summed over masks. All (N, H, W)."""
    logits, target, valid = logits.flatten(1), target.flatten(1), valid.flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * valid).sum(1) / valid.sum(1).clamp_min(1)
    p = logits.sigmoid() * valid
    dice = 1 - (2 * (p * target).sum(1) + 1) / (p.sum(1) + (target * valid).sum(1) + 1)
    return bce.sum(), dice.sum()


# Mask2Former's importance sampling (§4 "Training"; PointRend, Kirillov et al. 2020, §3.1):
# oversample k·N uniform points, keep the β·N where the prediction is least certain, add (1 − β)·N
# uniform ones
POINT_OVERSAMPLE = 3.0  # k
POINT_IMPORTANCE = 0.75  # β


def sample_at(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(M, H, W) maps read bilinearly at per-map points (M, P, 2), (x, y) in [0, 1]² → (M, P).

    Pixel centres sit at (j + 0.5) / W (align_corners=False). Outside the outermost centres the
    border value is repeated, not blended with zeros as Mask2Former's ``point_sample`` does, so a
    uniform point's expected value is the map's pixel mean (the loss is unbiased at the edges)."""
    grid = (2 * points - 1)[:, :, None, :].to(maps.dtype)  # (M, P, 1, 2)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0, :, 0]


def importance_points(logits: torch.Tensor, num_points: int, oversample: float = POINT_OVERSAMPLE,
                      importance: float = POINT_IMPORTANCE) -> torch.Tensor:
    """(M, num_points, 2) points per mask of ``logits`` (M, h, w): the ``importance`` share where
    |logit| is smallest among ``oversample`` × num_points uniform candidates, the rest uniform.
    Drawn from torch's global generator (the trainer seeds it per step)."""
    M, device = logits.shape[0], logits.device
    n_uncertain = int(importance * num_points)
    if n_uncertain == 0:
        return torch.rand(M, num_points, 2, device=device)
    candidates = torch.rand(M, max(int(oversample * num_points), n_uncertain), 2, device=device)
    with torch.no_grad():
        uncertainty = -sample_at(logits.detach().float(), candidates).abs()
    # unsorted: the loss is a sum over points, and topk's sort costs as much as the selection
    idx = uncertainty.topk(n_uncertain, dim=1, sorted=False).indices
    chosen = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(M, num_points - n_uncertain, 2, device=device)], 1)


def point_mask_losses(mask_logits: torch.Tensor, pairs, targets: list[dict], num_points: int,
                      points: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_bce_dice`` of matched masks on sampled points instead of every pixel.

    mask_logits (B, Q, h, w) at any resolution; ``pairs[b]`` = (prediction rows, target rows) of
    image b; ``targets[b]``: ``masks`` (N, H, W) and ``valid`` (H, W) at the image's resolution,
    read at the same points as the logits. Points: ``importance_points`` of the matched logits,
    unless ``points`` (M, P, 2), M = all pairs in order, is given. Nothing is resized or copied at
    the image's resolution: the cost is M × points, not M × H × W."""
    rows = [(b, qi, ti) for b, (qi, ti) in enumerate(pairs) if len(qi)]
    # one gather over (B·Q): its backward scatters once, not once per image into a zero (B, Q, h, w)
    flat = torch.cat([b * mask_logits.shape[1] + torch.as_tensor(qi) for b, qi, _ in rows]).to(mask_logits.device)
    logits = mask_logits.flatten(0, 1)[flat]
    if points is None:
        points = importance_points(logits, num_points)
    pred = sample_at(logits, points)
    target, valid, start = [], [], 0
    for b, _, ti in rows:
        p, start = points[start:start + len(ti)], start + len(ti)
        masks = targets[b]["masks"].to(pred.dtype)
        # each target's points at its own row (the rows are distinct): no (n, H, W) gather
        grid = p.new_full((masks.shape[0], p.shape[1], 2), 0.5)
        grid[ti] = p
        target.append(sample_at(masks, grid)[ti])
        valid.append(sample_at(targets[b]["valid"][None].to(pred.dtype), p.reshape(1, -1, 2)).view(len(ti), -1))
    return masked_bce_dice(pred, torch.cat(target), torch.cat(valid))


class SetCriterion:
    """Matching + BCE/dice/CE over every decoder stage (Mask2Former's deep supervision)."""

    def __init__(self, num_classes: int, no_object_weight: float = 0.1, w_class: float = 2.0,
                 w_mask: float = 5.0, w_dice: float = 5.0, num_points: int = 0):
        self.num_classes = num_classes
        self.num_points = num_points  # > 0: mask losses on sampled points (point_mask_losses)
        self.w_class, self.w_mask, self.w_dice = w_class, w_mask, w_dice
        self.class_weight = torch.ones(num_classes + 1)
        self.class_weight[-1] = no_object_weight
        self.matcher = HungarianMatcher(cost_class=w_class, cost_mask=w_mask, cost_dice=w_dice)

    def stage(self, class_logits, mask_logits, targets):
        """One decoder stage → (loss dict, matched indices)."""
        B, Q = class_logits.shape[:2]
        indices = self.matcher.match(mask_logits, class_logits, targets)
        target_classes = torch.full((B, Q), self.num_classes, dtype=torch.long, device=class_logits.device)
        num_masks = max(1, sum(len(t["labels"]) for t in targets))
        bce = dice = class_logits.new_zeros(())
        for b, ((qi, ti), t) in enumerate(zip(indices, targets)):
            if len(qi) == 0:
                continue
            target_classes[b, qi] = t["labels"][ti].to(class_logits.device)
            if self.num_points:
                continue
            m = resize_logits(mask_logits[b, qi][None], t["masks"].shape[-2:])[0]
            valid = t["valid"][None].expand_as(m)
            l_bce, l_dice = masked_bce_dice(m, t["masks"][ti].float(), valid)
            bce, dice = bce + l_bce, dice + l_dice
        if self.num_points and any(len(qi) for qi, _ in indices):
            bce, dice = point_mask_losses(mask_logits, indices, targets, self.num_points)
        ce = F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight=self.class_weight.to(class_logits))
        losses = {"loss_class": self.w_class * ce, "loss_mask": self.w_mask * bce / num_masks,
                  "loss_dice": self.w_dice * dice / num_masks}
        return losses, indices

    def __call__(self, class_logits: list[torch.Tensor], mask_logits: list[torch.Tensor], targets):
        """Lists over decoder stages (last = final). Returns the final stage's matching too."""
        total, parts, indices = 0.0, {}, None
        for s, (c, m) in enumerate(zip(class_logits, mask_logits)):
            losses, indices = self.stage(c, m, targets)
            total = total + sum(losses.values())
            if s == len(class_logits) - 1:
                parts = {k: v.detach() for k, v in losses.items()}
        return total / len(class_logits), parts, indices


def silog_loss(pred_log: torch.Tensor, depth: torch.Tensor, lam: float = 0.85) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014, as in DepthFormer/BTS):
    sqrt(mean(d²) − λ·mean(d)²)·10 with d = log ŷ − log y over pixels with depth > 0.
    λ < 1 keeps a little absolute-scale supervision, which AbsRel needs."""
    valid = depth > 0
    if not valid.any():
        return pred_log.sum() * 0
    d = pred_log[valid] - torch.log(depth[valid])
    return torch.sqrt((d.pow(2).mean() - lam * d.mean().pow(2)).clamp_min(1e-8)) * 10


def gaussian_heatmaps(keypoints: torch.Tensor, size, sigma: float = 1.0) -> torch.Tensor:
    """(N, 17, 3) keypoints (x, y, v) in pixels → (N, 17, H, W) Gaussians with peak 1 (σ = 1 px,
    paper §3.4). Pixel (i, j) has its centre at (x, y) = (j, i), the convention of the Instance
    keypoints the world renders (a joint at x = 3.0 lies in the middle of column 3)."""
    H, W = size
    ys = torch.arange(H, dtype=torch.float32)
    xs = torch.arange(W, dtype=torch.float32)
    x = keypoints[..., 0, None, None]
    y = keypoints[..., 1, None, None]
    g = torch.exp(-((xs[None, None, None, :] - x) ** 2 + (ys[None, None, :, None] - y) ** 2) / (2 * sigma**2))
    return g * (keypoints[..., 2, None, None] > 0)


def heatmap_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE summed over pixels, averaged over labelled joints (weight (N, 17) 0/1).

    Summing over pixels (instead of the mean over a mostly-zero map) keeps the loss of one σ = 1
    Gaussian at O(π) per joint, comparable to the mask losses it is added to."""
    se = (pred - target).pow(2).flatten(2).sum(-1)  # (N, 17)
    return (se * weight).sum() / weight.sum().clamp_min(1)


def heatmap_peaks(heatmaps: torch.Tensor) -> torch.Tensor:
    """(N, 17, H, W) → (N, 17, 3): x, y (pixel coordinates, sub-pixel) and peak value.

    Sub-pixel position: the vertex of a parabola through the log-heatmap at the argmax and its two
    neighbours, per axis (the Taylor step of DARK, Zhang et al. 2020). A Gaussian's log is a
    parabola, so this is exact for the Gaussian targets of ``gaussian_heatmaps``; a centroid of the
    3×3 window is not (it is pulled towards the argmax pixel by up to 0.2 px at σ = 1). Values are
    floored at 1e-3 × peak before the log, steps are clipped to ±0.5 px, and a border argmax keeps
    its integer position along the axis it touches.
    """
    N, J, H, W = heatmaps.shape
    flat = heatmaps.flatten(2).float()
    peak, idx = flat.max(-1)
    iy, ix = idx // W, idx % W
    floor = (peak.abs() * 1e-3).clamp_min(1e-12)

    def log_at(y, x):
        return torch.log(torch.maximum(flat.gather(-1, (y * W + x)[..., None])[..., 0], floor))

    def step(lo, mid, hi, inside):
        curvature = 2 * mid - lo - hi  # > 0 at a maximum
        d = torch.where(curvature > 1e-12, (hi - lo) / (2 * curvature.clamp_min(1e-12)), torch.zeros_like(mid))
        return torch.where(inside & (peak > 0), d.clamp(-0.5, 0.5), torch.zeros_like(d))

    c = log_at(iy, ix)
    xl, xr = (ix - 1).clamp_min(0), (ix + 1).clamp_max(W - 1)
    yu, yd = (iy - 1).clamp_min(0), (iy + 1).clamp_max(H - 1)
    dx = step(log_at(iy, xl), c, log_at(iy, xr), (ix > 0) & (ix < W - 1))
    dy = step(log_at(yu, ix), c, log_at(yd, ix), (iy > 0) & (iy < H - 1))
    return torch.stack([ix.float() + dx, iy.float() + dy, peak], -1)
