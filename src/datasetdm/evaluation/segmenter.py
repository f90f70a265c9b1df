"""An ordinary semantic segmenter, for measuring what a dataset is worth (stage 7).

The downstream check trains it on real, synthetic and joint data; the backbone's quality gates
use one trained on plenty of world data as a reference. It is a standard U-Net (Ronneberger et
al., 2015: two 3×3 conv-BN-ReLU per level, max-pool down, bilinear up with skip concatenation),
built from scratch so nothing is downloaded, and deliberately unrelated to the P-Decoder: it sees
pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasetdm.formats.sample import IGNORE_INDEX


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNetSegmenter(nn.Module):
    """U-Net with one 1×1 classifier per named head (e.g. {"semantic": 10, "colour": 9})."""

    def __init__(self, heads: dict[str, int], base: int = 24, depth: int = 4):
        super().__init__()
        widths = [base * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(_double_conv(cin, w))
            cin = w
        self.up = nn.ModuleList(_double_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth - 1)))
        self.heads = nn.ModuleDict({name: nn.Conv2d(widths[0], n, 1) for name, n in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1], H and W divisible by 2**(depth-1)."""
        x = (images - 0.5) / 0.25
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return {name: head(x) for name, head in self.heads.items()}


@dataclass
class SegmenterTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    flip: bool = True
    # bf16 autocast for the forward pass (weights, optimizer and loss stay fp32): ~1.7x faster
    # per step on an AVX512-BF16 CPU in a micro-benchmark; bench/segmenter_bf16.py measures speed
    # and mIoU of both. Off by default: existing recipes (the gates' reference segmenter, the
    # downstream figures) keep training exactly as they did until parity is measured
    bf16: bool = False


def _to_tensor_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def train_segmenter(
    images: np.ndarray,
    targets: dict[str, np.ndarray],
    num_classes: dict[str, int],
    config: SegmenterTrainConfig | None = None,
    progress=None,
    base: int = 24,
    depth: int = 4,
    callback=None,
    callback_every: int = 0,
    device: str = "cpu",
    init: dict | None = None,
) -> UNetSegmenter:
    """Train on uint8 images (N, H, W, 3) and per-head uint8 label maps (N, H, W) with 255 ignore.

    Sampling is with replacement from a seeded generator, so a run is reproducible.
    ``progress(step, loss)`` is called every step; ``callback(step, model)`` every
    ``callback_every`` steps (e.g. to measure a held-out set; the model is put back in train mode).
    ``device`` trains there (batches are drawn on the CPU, so a run draws the same batches anywhere);
    the model is returned on the CPU. ``init``: a state dict to start from (fine-tuning a model of
    the same heads) instead of a fresh initialisation.
    """
    config = config or SegmenterTrainConfig()
    if len(images) == 0:
        raise ValueError("no training images")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    # channels-last: oneDNN's convolutions run ~15% faster on CPU in that layout
    dev = torch.device(device)
    model = UNetSegmenter(num_classes, base=base, depth=depth)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    # kept as uint8 (N, 3, H, W); a batch is converted to float when drawn (4x less memory)
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    y_all = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.uint8)) for k, v in targets.items()}
    model.train()
    for step in range(config.steps):
        idx = torch.randint(len(x_all), (config.batch_size,), generator=gen)
        x = (x_all[idx].float() / 255.0).contiguous(memory_format=torch.channels_last)
        ys = {k: v[idx].long() for k, v in y_all.items()}
        if config.flip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            for k in ys:
                ys[k][flip] = ys[k][flip].flip(-1)
        x, ys = x.to(dev), {k: v.to(dev) for k, v in ys.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16):
            out = model(x)
        loss = sum(F.cross_entropy(out[k].float(), ys[k], ignore_index=IGNORE_INDEX) for k in ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
        if callback is not None and callback_every and (step + 1) % callback_every == 0 and step + 1 < config.steps:
            callback(step + 1, model)
            model.train()
    return model.cpu().eval()


@torch.no_grad()
def predict_segmenter(model: UNetSegmenter, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-head argmax label maps (N, H, W) uint8."""
    model.eval()
    dev = next(model.parameters()).device
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch_size):
        logits = model(_to_tensor_images(images[i : i + batch_size]).to(dev))
        for k, v in logits.items():
            outs.setdefault(k, []).append(v.argmax(1).to(torch.uint8).cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}
