"""Hypercolumn capture (paper §3.3): multi-scale UNet features and attention maps.

Everything goes through diffusers' public extension points: ``unet.set_attn_processor`` installs a
thin wrapper around each needed layer's own processor (restored afterwards) and forward hooks
read the up-block features. Nothing in diffusers is patched.

Cost: the wrapped processors call the original processor for the layer output (so the UNet's
output is unchanged) and, only during the one forward that is captured, recompute the query and
key of the conditional half to form the attention probabilities, averaging them into one running
sum per resolution. Per-layer or per-head maps are never stored, and layers whose maps are not
requested keep their original (SDPA) processor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.backbone.loader import Backbone
from datasetdm.errors import DatasetdmError


class _Recorder:
    """Collects one UNet forward's features and attention, averaged on the fly."""

    def __init__(self, self_attention_res: Sequence[int] = ()):
        self.active = False
        self.rows = slice(None)  # batch rows to keep: the conditional half under CFG
        self.self_res = {int(r) for r in self_attention_res}
        self.level_hw: dict[int, tuple[int, int]] = {}  # h*w -> (h, w) of each UNet level
        self.features: dict[int, torch.Tensor] = {}  # up block index -> (B, C, h, w)
        self.cross_sum: dict[int, torch.Tensor] = {}  # h*w -> (B, h*w, T) sum over layers
        self.cross_n: dict[int, int] = {}
        self.self_sum: dict[int, torch.Tensor] = {}  # h*w -> (B, h*w, h*w) sum over layers
        self.self_n: dict[int, int] = {}

    def set_latent_size(self, h: int, w: int, levels: int) -> None:
        self.level_hw = {(h >> i) * (w >> i): (h >> i, w >> i) for i in range(levels)}

    def wants(self, hw: int, cross: bool) -> bool:
        if cross:
            return True
        return hw in self.level_hw and self.level_hw[hw][0] in self.self_res

    def add_attention(self, attn, hidden_states, context, temb) -> None:
        cross = context is not None
        x = hidden_states[self.rows]
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb[self.rows])
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        hw = x.shape[1]
        if not self.wants(hw, cross):
            return
        # the same query/key preparation as diffusers' AttnProcessor2_0
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(x)
        if cross:
            c = context[self.rows]
            c = attn.norm_encoder_hidden_states(c) if attn.norm_cross else c
        else:
            c = x
        k = attn.to_k(c)
        b, heads = q.shape[0], attn.heads
        q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k = q.float(), k.float()
        scale = attn.scale
        if cross:
            # (B, heads, hw, T) is small (T <= 77): one shot, then the head average
            probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(1)
            store, count = self.cross_sum, self.cross_n
        else:
            # (B, hw, hw) per head can be large: accumulate head by head
            probs = torch.zeros(b, hw, hw, dtype=torch.float32, device=q.device)
            for i in range(heads):
                probs += torch.softmax(q[:, i] @ k[:, i].transpose(-1, -2) * scale, dim=-1)
            probs /= heads
            store, count = self.self_sum, self.self_n
        if hw in store:
            store[hw] += probs
        else:
            store[hw] = probs
        count[hw] = count.get(hw, 0) + 1

    def hypercolumns(self, input_ids, prompts, timestep) -> Hypercolumns:
        features = [self.features[j] for j in sorted(self.features, reverse=True)]  # highest res first
        cross = []
        for f in features:
            h, w = f.shape[-2:]
            if h * w not in self.cross_sum:
                raise DatasetdmError(f"the UNet has no cross-attention layer at resolution {h}x{w}")
            a = self.cross_sum[h * w] / self.cross_n[h * w]
            cross.append(a.transpose(1, 2).reshape(a.shape[0], a.shape[2], h, w))
        selfs = {}
        for hw, s in self.self_sum.items():
            selfs[self.level_hw[hw][0]] = s / self.self_n[hw]
        return Hypercolumns(
            features=features, cross_attention=cross, self_attention=selfs, input_ids=input_ids,
            prompts=list(prompts), timestep=None if timestep is None else int(timestep),
        )


class CaptureAttnProcessor:
    """Wraps a layer's attention processor: same output, plus the maps while recording."""

    def __init__(self, inner, recorder: _Recorder):
        self.inner = inner
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.recorder.active:
            # attention masks are not used by SD's UNet; the maps assume none
            with torch.no_grad():
                self.recorder.add_attention(attn, hidden_states, encoder_hidden_states, temb)
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )


class capture_hypercolumns:
    """Context manager that installs the capture processors and hooks on ``unet``, then removes them.

    Features: for each up block, the hidden state at the block's own resolution after all its
    resnets and (cross-)attention layers, i.e. the input of its upsampler (the block output for the
    last block, which has none). These are the decoder-side maps DatasetDM collects: they have
    mixed the skip connections (spatial detail) with the deepest, most semantic features, and the
    block outputs proper would give two maps at the highest resolution and none at the lowest
    (each upsampler doubles the size). For SD at 512 px: 64, 32, 16, 8 latent px.

    Cross-attention: every cross-attention layer (down, mid and up blocks; 16 in SD) grouped by
    resolution and averaged over layers and heads, as in §3.3. Self-attention: only at the sides
    in ``self_attention_res``.

    Set ``recorder.active = True`` (and ``recorder.rows``) around the one forward to capture.
    """

    def __init__(self, unet, self_attention_res: Sequence[int] = ()):
        self.unet = unet
        self.recorder = _Recorder(self_attention_res)
        self._originals = None
        self._hooks: list = []

    def __enter__(self) -> _Recorder:
        rec = self.recorder
        self._originals = dict(self.unet.attn_processors)
        procs = {}
        for name, proc in self._originals.items():
            module = self.unet.get_submodule(name[: -len(".processor")])
            needed = module.is_cross_attention or bool(rec.self_res)
            procs[name] = CaptureAttnProcessor(proc, rec) if needed else proc
        self.unet.set_attn_processor(procs)

        for j, block in enumerate(self.unet.up_blocks):
            def keep(x, j=j):
                if rec.active:
                    rec.features[j] = x[rec.rows].detach().clone()

            if getattr(block, "upsamplers", None):
                self._hooks.append(block.upsamplers[0].register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
            else:
                self._hooks.append(block.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
        return rec

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.unet.set_attn_processor(dict(self._originals))
        self.recorder.active = False


# ---------------------------------------------------------------------------------------------
# inputs


def _image_to_tensor(image) -> torch.Tensor:
    """One image as float (3, H, W) in [0, 1]. Grayscale, alpha and 16-bit are converted."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit PNGs open as I;16 (or I); keep their precision instead of clipping to 8 bits
            arr = np.asarray(image).astype(np.float32) / 65535.0
            image = np.clip(arr, 0.0, 1.0)
        elif image.mode == "F":
            image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        else:
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA")
            image = np.asarray(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            t = torch.from_numpy(arr.astype(np.float32) / 255.0)
        elif arr.dtype == np.uint16:
            t = torch.from_numpy(arr.astype(np.float32) / 65535.0)
        elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.floating):
            t = torch.from_numpy(arr.astype(np.float32))
        else:
            raise DatasetdmError(f"image array of dtype {arr.dtype}: expected uint8, uint16 or float in [0, 1]")
        if t.ndim == 2:
            t = t[..., None]
        if t.ndim != 3:
            raise DatasetdmError(f"image array of shape {tuple(arr.shape)}: expected (H, W) or (H, W, C)")
        t = t.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise DatasetdmError(f"image tensor of shape {tuple(image.shape)}: expected (C, H, W)")
    else:
        raise DatasetdmError(f"unsupported image type {type(image).__name__}: pass PIL images, arrays or tensors")

    c = t.shape[0]
    if c == 4 or c == 2:
        # composite over white: what a viewer shows, and it hides colour stored under alpha 0
        rgb, alpha = t[:-1], t[-1:]
        t = rgb * alpha + (1.0 - alpha)
        c -= 1
    if c == 1:
        t = t.expand(3, -1, -1)
    elif c != 3:
        raise DatasetdmError(f"image with {t.shape[0]} channels: expected 1 (gray), 2, 3 (RGB) or 4 (RGBA)")
    return t.clamp(0.0, 1.0)


def preprocess_images(images, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], each image resized (stretched) to ``size`` = (H, W).

    Stretching keeps every pixel; labels of the image must be resized the same way (nearest).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for im in images:
        t = _image_to_tensor(im)[None]
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        out.append(t)
    return torch.cat(out) * 2.0 - 1.0


def _check_size(backbone: Backbone, height: int, width: int) -> None:
    m = backbone.size_multiple
    if height % m or width % m or height <= 0 or width <= 0:
        raise DatasetdmError(f"image size {height}x{width}: both sides must be positive multiples of {m} for {backbone.name}")


def _prompts_and_seeds(prompts, seeds, n: int | None) -> tuple[list[str], list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts] * (n or 1)
    prompts = list(prompts)
    if n is not None and len(prompts) != n:
        raise DatasetdmError(f"{len(prompts)} prompts for {n} images: pass one prompt per image (or one string)")
    if seeds is None:
        seeds = [0] * len(prompts)
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise DatasetdmError(f"{len(seeds)} seeds for {len(prompts)} prompts: pass one seed per sample")
    return prompts, seeds


def _noise(shape, seeds: list[int], device, dtype) -> tuple[torch.Tensor, list[torch.Generator]]:
    # one generator per sample, drawn on the CPU: a sample's noise depends on its seed only,
    # not on its batch, its position in it, or the device
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device=device, dtype=dtype), gens


# ---------------------------------------------------------------------------------------------
# entry points


@torch.no_grad()
def capture_real(
    backbone: Backbone,
    images,
    prompts,
    t: int = 1,
    seeds: Sequence[int] | None = None,
    self_attention_res: Sequence[int] = (),
    size: tuple[int, int] | None = None,
) -> Hypercolumns:
    """Hypercolumns of real images (paper §3.3): VAE-encode, noise to timestep ``t``, one UNet pass.

    ``images``: PIL images, uint8/uint16/float arrays (H, W[, C]) or float tensors (C, H, W) in
    [0, 1]; any size, resized to ``size`` (default the model's native size). ``prompts``: one per
    image (or one string for all). ``seeds``: one per image for the added noise (default 0 each).
    The VAE posterior mean is used, so only the timestep noise is random.
    """
    h, w = size or backbone.native_size
    _check_size(backbone, h, w)
    pixels = preprocess_images(images, (h, w))
    prompts, seeds = _prompts_and_seeds(prompts, seeds, pixels.shape[0])
    n_train = backbone.scheduler.config.num_train_timesteps
    if not 0 <= int(t) < n_train:
        raise DatasetdmError(f"timestep t={t}: must be in [0, {n_train})")

    device, dtype = backbone.device, backbone.dtype
    latents = backbone.vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.mode()
    latents = _scale_latents(backbone, latents)
    noise, _ = _noise(latents.shape[1:], seeds, device, dtype)
    # the training noise schedule (shared by every scheduler config) defines q(x_t | x_0)
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(backbone.scheduler.config)
    timesteps = torch.full((len(prompts),), int(t), dtype=torch.long, device=device)
    noisy = ddpm.add_noise(latents, noise, timesteps)

    context, input_ids = backbone.encode_prompt(prompts)
    with capture_hypercolumns(backbone.unet, self_attention_res) as rec:
        rec.set_latent_size(*noisy.shape[-2:], len(backbone.unet.config.down_block_types))
        rec.active = True
        backbone.unet(noisy, timesteps, encoder_hidden_states=context)
        rec.active = False
    return rec.hypercolumns(input_ids, prompts, t)


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts,
    seeds: Sequence[int],
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    capture_step: int = -1,
    self_attention_res: Sequence[int] = (),
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    capture: bool = True,
) -> tuple[np.ndarray, Hypercolumns | None]:
    """Text-to-image with the backbone's scheduler; hypercolumns captured at ``capture_step``.

    Returns images as uint8 (B, H, W, 3) and the hypercolumns (``None`` if ``capture=False``)
    of the UNet forward at step ``capture_step`` (Python indexing over the denoising steps;
    default the last, as DatasetDM does). Classifier-free guidance when ``guidance_scale > 1``;
    then only the conditional half is captured. Each sample's initial noise and any scheduler
    noise come from its own generator seeded with its seed, so it does not depend on its batch.
    """
    prompts, seeds = _prompts_and_seeds(prompts, seeds, None)
    if num_inference_steps < 1:
        raise DatasetdmError(f"num_inference_steps={num_inference_steps}: must be at least 1")
    if not -num_inference_steps <= capture_step < num_inference_steps:
        raise DatasetdmError(f"capture_step={capture_step}: out of range for {num_inference_steps} steps")
    capture_index = capture_step % num_inference_steps
    nh, nw = backbone.native_size
    height, width = height or nh, width or nw
    _check_size(backbone, height, width)

    device, dtype = backbone.device, backbone.dtype
    b = len(prompts)
    cond, input_ids = backbone.encode_prompt(prompts)
    do_cfg = guidance_scale > 1.0
    context = torch.cat([backbone.encode_prompt([negative_prompt] * b)[0], cond]) if do_cfg else cond

    # a fresh scheduler per call: set_timesteps and multistep solvers keep state
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    f = backbone.vae_scale_factor
    shape = (backbone.unet.config.in_channels, height // f, width // f)
    latents, gens = _noise(shape, seeds, device, dtype)
    latents = latents * scheduler.init_noise_sigma
    import inspect

    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}

    ctx = capture_hypercolumns(backbone.unet, self_attention_res) if capture else None
    rec = ctx.__enter__() if ctx else None
    try:
        if rec:
            rec.set_latent_size(shape[1], shape[2], len(backbone.unet.config.down_block_types))
            rec.rows = slice(b, 2 * b) if do_cfg else slice(None)
        captured_t = None
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([latents, latents]) if do_cfg else latents
            x = scheduler.scale_model_input(x, t)
            if rec and i == capture_index:
                rec.active, captured_t = True, t
            eps = backbone.unet(x, t, encoder_hidden_states=context).sample
            if rec:
                rec.active = False
            if do_cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        hc = rec.hypercolumns(input_ids, prompts, captured_t) if rec else None
    finally:
        if ctx:
            ctx.__exit__(None, None, None)

    images = backbone.vae.decode(_unscale_latents(backbone, latents)).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy(), hc


def _scale_latents(backbone: Backbone, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(backbone.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * backbone.latent_scaling_factor


def _unscale_latents(backbone: Backbone, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(backbone.vae.config, "shift_factor", None) or 0.0
    return latents / backbone.latent_scaling_factor + shift
