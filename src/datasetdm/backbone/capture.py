"""Hypercolumn capture (paper §3.3): multi-scale UNet features and attention maps.

Everything goes through diffusers' public extension points: ``Attention.set_processor`` installs
a thin wrapper around each needed layer's own processor (restored afterwards) and forward hooks
read the up-block features. Nothing in diffusers is patched.

Cost: the wrapped processors call the original processor for the layer output (so the UNet's
output is bit-identical) and, only during the one forward that is captured, recompute the query
and key of the conditional half to form the attention probabilities, averaging them into one
running sum per resolution. Per-layer or per-head maps are never stored; layers whose maps are not
requested keep their original (SDPA) processor, unwrapped.

Side branch (training-free labels, Dataset Diffusion): with ``class_prompt_embeds`` (B, Tc, D),
every cross-attention layer also computes softmax(Q · to_k(class_prompt_embeds)ᵀ · scale) for the
image queries of that forward, averaged per resolution like the prompt maps, and returns its
normal output unchanged: the class prompt observes the image, it does not steer it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.backbone.loader import Backbone, PromptEmbeddings
from datasetdm.errors import DatasetdmError

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def attention_level(name: str, levels: int) -> int | None:
    """UNet level (0 = highest resolution) at which the attention layer ``name`` runs.

    SD-format UNets (``UNet2DConditionModel``): down block i attends before its downsampler, at
    level i; the mid block at the lowest level; up block j before its upsampler, at level
    ``levels - 1 - j``. ``None`` for a name outside that layout.
    """
    m = _BLOCK.match(name)
    if m is None:
        return None
    if m.group(1) is None:
        return levels - 1
    i = int(m.group(2))
    return i if m.group(1) == "down_blocks" else levels - 1 - i


def level_sizes(latent_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """(h, w) of each UNet level for a latent of ``latent_size`` (stride-2 convs round up)."""
    h, w = (int(latent_size), int(latent_size)) if isinstance(latent_size, int) else map(int, latent_size)
    return [(-(-h // 2**i), -(-w // 2**i)) for i in range(levels)]


class _Recorder:
    """Collects one UNet forward's features and attention, averaged on the fly."""

    def __init__(self, latent_size: tuple[int, int], levels: int, self_attention_res: Sequence[int] = ()):
        self.active = False
        self.rows = slice(None)  # batch rows to keep: the conditional half under CFG
        self.sizes = level_sizes(latent_size, levels)
        self.level_hw = {h * w: (h, w) for h, w in self.sizes}  # h*w -> (h, w) of each UNet level
        sides = [h for h, _ in self.sizes]
        self.self_res = {int(r) for r in self_attention_res}
        bad = sorted(self.self_res - set(sides))
        if bad:
            raise DatasetdmError(
                f"self_attention_res {bad}: not a UNet level side for latent size "
                f"{self.sizes[0][0]}x{self.sizes[0][1]} (levels: {sides})"
            )
        self.self_levels = {sides.index(r) for r in self.self_res}
        # optional side branch: (B, Tc, D) class-prompt encoder states, for the kept rows
        self.class_context: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.features: dict[int, torch.Tensor] = {}  # up block index -> (B, C, h, w)
        self.cross_sum: dict[int, torch.Tensor] = {}  # h*w -> (B, h*w, T) sum over layers
        self.cross_n: dict[int, int] = {}
        self.class_sum: dict[int, torch.Tensor] = {}  # h*w -> (B, h*w, Tc) sum over layers
        self.class_n: dict[int, int] = {}
        self.self_sum: dict[int, torch.Tensor] = {}  # h*w -> (B, h*w, h*w) sum over layers
        self.self_n: dict[int, int] = {}

    @contextmanager
    def capturing(self, rows: slice = slice(None)):
        """Record the forward(s) run inside: fresh sums, ``rows`` of the batch kept."""
        self.reset()
        self.rows, self.active = rows, True
        try:
            yield self
        finally:
            self.active = False

    @staticmethod
    def _add(store: dict, count: dict, hw: int, probs: torch.Tensor) -> None:
        if hw in store:
            store[hw] += probs
        else:
            store[hw] = probs
        count[hw] = count.get(hw, 0) + 1

    def add_attention(self, attn, hidden_states, context, temb, want_self: bool) -> None:
        cross = context is not None
        if not cross and not want_self:
            return
        x = hidden_states[self.rows]
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb[self.rows])
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        hw = x.shape[1]
        if not cross and (hw not in self.level_hw or self.level_hw[hw][0] not in self.self_res):
            return
        # the same query/key preparation as diffusers' AttnProcessor2_0
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        b, heads = x.shape[0], attn.heads
        q = self._heads(attn, attn.to_q(x), attn.norm_q, b, heads)
        if cross:
            probs = self._cross_probs(attn, q, context[self.rows])
            self._add(self.cross_sum, self.cross_n, hw, probs)
            if self.class_context is not None:
                c = self.class_context
                if c.shape[0] != b:
                    if c.shape[0] != 1:
                        raise DatasetdmError(f"class_prompt_embeds has {c.shape[0]} rows for a batch of {b}: pass {b} or 1")
                    c = c.expand(b, -1, -1)
                probs = self._cross_probs(attn, q, c.to(device=x.device, dtype=x.dtype))
                self._add(self.class_sum, self.class_n, hw, probs)
        else:
            k = self._heads(attn, attn.to_k(x), attn.norm_k, b, heads).float()
            # (B, hw, hw) per head can be large: accumulate head by head, never all heads at once
            probs = torch.zeros(b, hw, hw, dtype=torch.float32, device=q.device)
            for i in range(heads):
                probs += torch.softmax(torch.matmul(q[:, i], k[:, i].transpose(-1, -2)) * attn.scale, dim=-1)
            probs /= heads
            self._add(self.self_sum, self.self_n, hw, probs)

    @staticmethod
    def _heads(attn, t: torch.Tensor, norm, b: int, heads: int) -> torch.Tensor:
        t = t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
        if norm is not None:
            t = norm(t)
        return t.float()

    def _cross_probs(self, attn, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Head-averaged softmax(Q Kᵀ · scale) over the tokens of ``c``: (B, hw, T), float32."""
        if attn.norm_cross:
            c = attn.norm_encoder_hidden_states(c)
        k = self._heads(attn, attn.to_k(c), attn.norm_k, q.shape[0], attn.heads)
        # (B, heads, hw, T) is small (T <= 77): one shot, then the head average
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1).mean(1)

    def _maps(self, store: dict, count: dict, what: str) -> list[torch.Tensor]:
        """(B, T, h, w) per feature resolution. A resolution without cross-attention layers (SDXL's
        highest: its first down and last up block have none) gets the map of the nearest
        resolution that has them, bilinearly upsampled: a per-pixel convex mix of distributions,
        so it still sums to one over the tokens."""
        features = self._features()
        sizes = [tuple(f.shape[-2:]) for f in features]
        own = {}
        for h, w in sizes:
            if h * w in store:
                a = store[h * w] / count[h * w]
                own[(h, w)] = a.transpose(1, 2).reshape(a.shape[0], a.shape[2], h, w)
        if not own:
            raise DatasetdmError(f"the UNet has no cross-attention layer at any feature resolution ({what})")
        out = []
        for h, w in sizes:
            if (h, w) in own:
                out.append(own[(h, w)])
                continue
            nearest = min(own, key=lambda hw: abs(hw[0] * hw[1] - h * w))
            out.append(F.interpolate(own[nearest], size=(h, w), mode="bilinear", align_corners=False))
        return out

    def _features(self) -> list[torch.Tensor]:
        if not self.features:
            raise DatasetdmError("nothing was captured: run one UNet forward while the recorder is active")
        return [self.features[j] for j in sorted(self.features, reverse=True)]  # highest res first

    def hypercolumns(self, input_ids, prompts, timestep) -> Hypercolumns:
        features = self._features()
        cross = self._maps(self.cross_sum, self.cross_n, "prompt")
        classes = self._maps(self.class_sum, self.class_n, "class prompt") if self.class_context is not None else None
        selfs = {self.level_hw[hw][0]: s / self.self_n[hw] for hw, s in self.self_sum.items()}
        return Hypercolumns(
            features=features, cross_attention=cross, self_attention=selfs, input_ids=input_ids,
            prompts=list(prompts), timestep=None if timestep is None else int(timestep), class_attention=classes,
        )


class CaptureAttnProcessor:
    """Wraps a layer's attention processor: same output, plus the maps while recording."""

    def __init__(self, inner, recorder: _Recorder, want_self: bool = False):
        self.inner = inner
        self.recorder = recorder
        self.want_self = want_self

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.recorder.active:
            # attention masks are not used by SD's UNet; the maps assume none
            with torch.no_grad():
                self.recorder.add_attention(attn, hidden_states, encoder_hidden_states, temb, self.want_self)
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )


class capture_hypercolumns:
    """Context manager that installs the capture processors and hooks on ``unet``, then removes them.

    ``latent_size``: (h, w) of the latent the UNet will see (image size / VAE factor); it fixes
    each level's resolution, so only the layers whose maps are requested are wrapped.

    Features: for each up block, the hidden state at the block's own resolution after all its
    resnets and (cross-)attention layers, i.e. the input of its upsampler (the block output for the
    last block, which has none). These are the decoder-side maps DatasetDM collects: they have
    mixed the skip connections (spatial detail) with the deepest, most semantic features, and the
    block outputs proper would give two maps at the highest resolution and none at the lowest
    (each upsampler doubles the size). One per UNet resolution: for SD 1.x at 512 px 64, 32, 16,
    8 latent px; SD 2.x-v at 768 px 96, 48, 24, 12; SDXL at 1024 px 128, 64, 32.

    Cross-attention: every cross-attention layer (down, mid and up blocks; 16 in SD, 70 in SDXL)
    grouped by resolution and averaged over layers and heads, as in §3.3. A resolution without
    such layers (SDXL's highest) gets the nearest resolution's map upsampled (``_Recorder._maps``). Self-attention: only the layers at
    the sides in ``self_attention_res`` are wrapped for it. ``class_prompt_embeds`` (B or 1, Tc, D):
    the class-prompt side branch (``Hypercolumns.class_attention``); it can also be set later as
    ``recorder.class_context``.

    Record with ``with rec.capturing(rows): unet(...)`` (or set ``rec.active`` around the one
    forward; ``rec.rows`` = the conditional half under CFG).
    """

    def __init__(self, unet, latent_size, self_attention_res: Sequence[int] = (), class_prompt_embeds=None):
        self.unet = unet
        self.levels = len(unet.config.down_block_types)
        self.recorder = _Recorder(latent_size, self.levels, self_attention_res)
        self.recorder.class_context = class_prompt_embeds
        self._originals = None
        self._hooks: list = []

    def __enter__(self) -> _Recorder:
        from diffusers.models.attention_processor import Attention

        rec = self.recorder
        # Attention.get_processor/set_processor per layer (what unet.set_attn_processor does for
        # all of them), so only the layers whose maps are needed are touched: entering and leaving
        # costs one walk over the modules, not five (measurable on small UNets)
        self._originals = {}
        try:
            for name, module in self.unet.named_modules():
                if not isinstance(module, Attention):
                    continue
                if module.is_cross_attention:
                    want_self = False
                else:
                    level = attention_level(name, self.levels)
                    # a layer outside the SD layout is wrapped when any self-attention is asked for
                    # and keeps its map only if its resolution matches (checked at run time)
                    if not rec.self_levels or (level is not None and level not in rec.self_levels):
                        continue
                    want_self = True
                proc = module.get_processor()
                self._originals[module] = proc
                module.set_processor(CaptureAttnProcessor(proc, rec, want_self=want_self))
            for j, block in enumerate(self.unet.up_blocks):
                def keep(x, j=j):
                    if rec.active:
                        rec.features[j] = x[rec.rows].detach().clone()

                if getattr(block, "upsamplers", None):
                    hook = block.upsamplers[0].register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0]))
                else:
                    hook = block.register_forward_hook(lambda m, args, out, keep=keep: keep(out))
                self._hooks.append(hook)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return rec

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module, proc in (self._originals or {}).items():
            module.set_processor(proc)
        self._originals = None
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


def _class_context(backbone: Backbone, class_prompt_embeds, b: int) -> torch.Tensor | None:
    if class_prompt_embeds is None:
        return None
    c = torch.as_tensor(class_prompt_embeds)
    d = backbone.unet.config.cross_attention_dim
    d = d[0] if isinstance(d, (list, tuple)) else d
    if c.ndim != 3 or c.shape[0] not in (1, b) or c.shape[-1] != d:
        raise DatasetdmError(
            f"class_prompt_embeds of shape {tuple(c.shape)}: expected ({b} or 1, Tc, {d}) "
            "(e.g. backbone.encode_prompt([class prompt])[0])"
        )
    return c.to(device=backbone.device, dtype=backbone.dtype)


@torch.no_grad()
def capture_real(
    backbone: Backbone,
    images,
    prompts,
    t: int = 1,
    seeds: Sequence[int] | None = None,
    self_attention_res: Sequence[int] = (),
    size: tuple[int, int] | None = None,
    class_prompt_embeds: torch.Tensor | None = None,
) -> Hypercolumns:
    """Hypercolumns of real images (paper §3.3): VAE-encode, noise to timestep ``t``, one UNet pass.

    ``images``: PIL images, uint8/uint16/float arrays (H, W[, C]) or float tensors (C, H, W) in
    [0, 1]; any size, resized to ``size`` (default the model's native size). ``prompts``: one per
    image (or one string for all). ``seeds``: one per image for the added noise (default 0 each).
    The VAE posterior mean is used, so only the timestep noise is random. The noising is
    q(x_t | x_0) of the training schedule, the same for every prediction type (epsilon or
    v-prediction): the UNet's output is never read here, only its features and attention.
    ``self_attention_res``: latent sides whose self-attention maps to keep (default none).
    ``class_prompt_embeds`` (B or 1, Tc, D): class-prompt side branch, see ``generate``.
    """
    h, w = size or backbone.native_size
    _check_size(backbone, h, w)
    pixels = preprocess_images(images, (h, w))
    prompts, seeds = _prompts_and_seeds(prompts, seeds, pixels.shape[0])
    n_train = backbone.scheduler.config.num_train_timesteps
    if not 0 <= int(t) < n_train:
        raise DatasetdmError(f"timestep t={t}: must be in [0, {n_train})")
    class_context = _class_context(backbone, class_prompt_embeds, len(prompts))

    device, dtype = backbone.device, backbone.dtype
    latents = backbone.vae.encode(pixels.to(device=device, dtype=backbone.vae_dtype)).latent_dist.mode()
    latents = _scale_latents(backbone, latents).to(dtype)
    noise, _ = _noise(latents.shape[1:], seeds, device, dtype)
    # the training noise schedule (shared by every scheduler config) defines q(x_t | x_0)
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(backbone.scheduler.config)
    timesteps = torch.full((len(prompts),), int(t), dtype=torch.long, device=device)
    noisy = ddpm.add_noise(latents, noise, timesteps)

    emb = backbone.embed_prompts(prompts)
    conditioning = backbone.unet_conditioning(emb, (h, w))
    with capture_hypercolumns(backbone.unet, noisy.shape[-2:], self_attention_res, class_context) as rec:
        with rec.capturing():
            backbone.unet(noisy, timesteps, **conditioning)
        return rec.hypercolumns(emb.input_ids, prompts, t)


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
    class_prompt_embeds: torch.Tensor | None = None,
) -> tuple[np.ndarray, Hypercolumns | None]:
    """Text-to-image with the backbone's scheduler; hypercolumns captured at ``capture_step``.

    Returns images as uint8 (B, H, W, 3) and the hypercolumns (``None`` if ``capture=False``)
    of the UNet forward at step ``capture_step`` (Python indexing over the denoising steps;
    default the last, as DatasetDM does). Classifier-free guidance when ``guidance_scale > 1``;
    then only the conditional half is captured. Every conditioning input of the family is
    doubled for guidance: SDXL's pooled embedding and time ids as well as the text states (an
    empty ``negative_prompt`` is zero conditioning where the model asks for it, as SDXL does).
    The scheduler, built from the model's config, reads the UNet output as its
    ``prediction_type`` says (epsilon, or v for SD 2.x 768-v). Each sample's initial noise and any scheduler
    noise come from its own generator seeded with its seed, so it does not depend on its batch.

    ``class_prompt_embeds`` (B or 1, Tc, D), e.g. ``backbone.encode_prompt(["dog cat bus"])[0]``:
    the training-free labeler's side branch. At the captured forward every cross-attention layer
    also attends from the image queries to these states (its own ``to_k``), giving
    ``Hypercolumns.class_attention`` (B, Tc, h, w) per resolution, summing to 1 over Tc; the
    generated images are bit-identical to a run without it.
    """
    prompts, seeds = _prompts_and_seeds(prompts, seeds, None)
    if num_inference_steps < 1:
        raise DatasetdmError(f"num_inference_steps={num_inference_steps}: must be at least 1")
    if not -num_inference_steps <= capture_step < num_inference_steps:
        raise DatasetdmError(f"capture_step={capture_step}: out of range for {num_inference_steps} steps")
    if class_prompt_embeds is not None and not capture:
        raise DatasetdmError("class_prompt_embeds needs capture=True (it is part of the captured hypercolumns)")
    capture_index = capture_step % num_inference_steps
    nh, nw = backbone.native_size
    height, width = height or nh, width or nw
    _check_size(backbone, height, width)

    device, dtype = backbone.device, backbone.dtype
    b = len(prompts)
    class_context = _class_context(backbone, class_prompt_embeds, b)
    emb = backbone.embed_prompts(prompts)
    input_ids = emb.input_ids
    do_cfg = guidance_scale > 1.0
    if do_cfg:
        emb = PromptEmbeddings.cat([backbone.negative_embeddings(negative_prompt, b), emb])
    conditioning = backbone.unet_conditioning(emb, (height, width))

    # a fresh scheduler per call: set_timesteps and multistep solvers keep state
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    f = backbone.vae_scale_factor
    shape = (backbone.unet.config.in_channels, height // f, width // f)
    latents, gens = _noise(shape, seeds, device, dtype)
    latents = latents * scheduler.init_noise_sigma
    import inspect

    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}

    rows = slice(b, 2 * b) if do_cfg else slice(None)  # the conditional half
    # built (and its arguments checked) before the first step, entered only around the captured one
    cap = capture_hypercolumns(backbone.unet, shape[1:], self_attention_res, class_context) if capture else None
    hc = None
    for i, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents, latents]) if do_cfg else latents
        x = scheduler.scale_model_input(x, t)
        if cap is not None and i == capture_index:
            # processors and hooks are installed for this one forward only: the other steps run
            # the UNet exactly as without capture, at no cost
            with cap as rec:
                with rec.capturing(rows):
                    out = backbone.unet(x, t, **conditioning).sample
                hc = rec.hypercolumns(input_ids, prompts, t)
        else:
            out = backbone.unet(x, t, **conditioning).sample
        if do_cfg:
            # linear in the output, so the same for a noise or a velocity (v) prediction
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample

    images = backbone.vae.decode(_unscale_latents(backbone, latents).to(backbone.vae_dtype)).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy(), hc


def _scale_latents(backbone: Backbone, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(backbone.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * backbone.latent_scaling_factor


def _unscale_latents(backbone: Backbone, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(backbone.vae.config, "shift_factor", None) or 0.0
    return latents / backbone.latent_scaling_factor + shift
