"""P-Decoder building blocks (paper §3.4, supplementary §3.2): 1×1 fusion, pixel decoder.

Plain nn.Modules. The pixel decoder follows supplementary §3.2: per level a 1×1 conv, linear
upsampling, concatenation with the next finer level, and a "mix-conv" of two 3×3 convs.

Optional image path: the embedded backbone's finest feature map is only 16×16 for a 64×64
image, so masks decoded from it alone are blocky at boundaries. The image is available at
both entry points (real images in training, generated images in generation), so the pixel
decoder can keep upsampling ×2 to image resolution, each stage concatenating a small conv stem
of the image at that scale. This adds no resolution limit and costs little.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class MixConv(nn.Sequential):
    """Two 3×3 convs that blend concatenated levels (supplementary §3.2 "Mix-conv")."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
        )


class Fusion(nn.Module):
    """F̂ = Conv1×1([F, Â]) per resolution (paper §3.3). GroupNorm after it because feature scales
    differ wildly between backbones (SD-1.5 activations vs the embedded model's)."""

    def __init__(self, feature_channels: list[int], attention_channels: int, dim: int):
        super().__init__()
        self.attention_channels = attention_channels
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c + attention_channels, dim, 1), norm(dim), nn.ReLU(inplace=True))
            for c in feature_channels
        )

    def forward(self, features: list[torch.Tensor], attention: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, (conv, f) in enumerate(zip(self.convs, features)):
            x = f.float()
            if self.attention_channels:
                a = attention[i]
                a = a.float()
                if a.shape[-2:] != f.shape[-2:]:
                    a = F.interpolate(a, size=f.shape[-2:], mode="bilinear", align_corners=False)
                x = torch.cat([x, a], 1)
            out.append(conv(x))
        return out


def image_stages(feature_size: tuple[int, int], image_size: tuple[int, int]) -> int:
    """Number of ×2 stages from the finest feature map up to image resolution."""
    ratio = max(image_size[0] / feature_size[0], image_size[1] / feature_size[1])
    return max(0, math.ceil(math.log2(ratio) - 1e-6))


class PixelDecoder(nn.Module):
    """Top-down FPN-like decoder over the fused levels (highest resolution first).

    Returns (levels for the transformer decoder, lowest resolution first; per-pixel embeddings at
    the finest resolution reached — image resolution when the image path is on).
    """

    def __init__(self, num_levels: int, dim: int, num_image_stages: int = 0):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(num_levels - 1))
        self.mix = nn.ModuleList(MixConv(2 * dim, dim) for _ in range(num_levels - 1))
        # image stages halve the width at each ×2 (at least 16): 3×3 convs at 64×64 px dominate
        # the cost otherwise, and boundaries need little width
        widths = [max(16, dim >> (k + 1)) for k in range(num_image_stages)]
        prev = [dim] + widths[:-1]
        self.image_stems = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1))
            for _ in range(num_image_stages)
        )
        self.image_lateral = nn.ModuleList(nn.Conv2d(p, w, 1) for p, w in zip(prev, widths))
        self.image_mix = nn.ModuleList(MixConv(w + 16, w) for w in widths)
        self.out = nn.Conv2d(widths[-1] if widths else dim, dim, 1)

    def forward(
        self, fused: list[torch.Tensor], image: torch.Tensor | None = None, stride: int = 1
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``stride``: the image path ends at 1/stride of the image (DecoderConfig.mask_stride)."""
        x = fused[-1]
        outs = [x]
        for i in range(len(fused) - 2, -1, -1):
            up = F.interpolate(self.lateral[i](x), size=fused[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.mix[i](torch.cat([up, fused[i]], 1))
            outs.append(x)
        if len(self.image_stems):
            if image is None:
                raise ValueError("this decoder was built with the image path: pass the image")
            full = tuple(image.shape[-2:])
            H, W = full if stride == 1 else (-(-full[0] // stride), -(-full[1] // stride))
            for k, (stem, lat, mix) in enumerate(zip(self.image_stems, self.image_lateral, self.image_mix)):
                last = k == len(self.image_stems) - 1
                size = (H, W) if last else (min(H, x.shape[-2] * 2), min(W, x.shape[-1] * 2))
                img = image if tuple(size) == full else F.interpolate(image, size=size, mode="area")
                up = F.interpolate(lat(x), size=size, mode="bilinear", align_corners=False)
                x = mix(torch.cat([up, stem(img * 2 - 1)], 1))
        # Mask2Former attends over three levels, coarsest first; pad by repetition for shallow UNets.
        levels = outs[:3]
        while len(levels) < 3:
            levels.append(levels[-1])
        return levels, self.out(x)


class MLP(nn.Sequential):
    def __init__(self, cin: int, hidden: int, cout: int, layers: int = 2):
        mods: list[nn.Module] = []
        dims = [cin] + [hidden] * (layers - 1) + [cout]
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)
