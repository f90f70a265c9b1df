"""Load a text-to-image latent diffusion model from a diffusers-format folder or hub id.

Families (``model_index.json``'s ``_class_name`` names the pipeline; the UNet and VAE configs
say the rest, read before any weights):

* ``sd``: one text encoder, the last hidden state conditions the UNet — SD 1.x (CLIP, 768-d),
  SD 2.x (OpenCLIP as CLIPTextModel, 1024-d; epsilon or v-prediction, the scheduler's
  ``prediction_type``), and BERT-style encoders such as the embedded backbone's MiniLM.
* ``sdxl``: two text encoders whose penultimate hidden states are concatenated (768 + 1280 =
  2048-d), plus added conditions: the second encoder's pooled, projected text embedding and the
  size/crop time ids (``addition_embed_type="text_time"``); three UNet resolutions.

Refused with a ``DatasetdmError`` naming the family and why: transformer (DiT) models — SD3,
Flux, PixArt and the like have no UNet up blocks to take hypercolumns from — and UNets that take
more than the noisy latent (inpainting: 9 input channels; instruct-pix2pix: 8; depth-to-image,
upscalers), or other added conditions (unCLIP, Kandinsky, the SDXL refiner). Components are
loaded with the public diffusers/transformers classes; nothing is patched.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasetdm.config import STRICT, read_config, read_json
from datasetdm.errors import DatasetdmError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # SDXL's second text encoder and its tokenizer
# SD's CLIP context length; BERT-style tokenizers allow 512 but the UNet was trained on <= 77
MAX_TOKENS = 77
SD, SDXL = "sd", "sdxl"  # Backbone.family


def embedded_backbone_path() -> Path:
    """Folder of the backbone shipped inside the package (diffusers layout)."""
    return Path(__file__).resolve().parent.parent / "assets" / "embedded"


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on for a batch of prompts."""

    states: torch.Tensor  # (B, T, D): encoder_hidden_states, what cross-attention reads
    input_ids: torch.Tensor  # (B, T): the first tokenizer's ids, where class tokens are found
    pooled: torch.Tensor | None = None  # (B, P): SDXL's pooled, projected text embedding

    @staticmethod
    def cat(parts: list["PromptEmbeddings"]) -> "PromptEmbeddings":
        """Batches stacked in order (CFG: unconditional half first)."""
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return PromptEmbeddings(torch.cat([p.states for p in parts]), torch.cat([p.input_ids for p in parts]), pooled)


@dataclass(eq=False)
class Backbone:
    """The frozen components of a latent diffusion model, plus what capture needs to know.

    ``text_encoder_2``/``tokenizer_2`` are SDXL's second encoder (``CLIPTextModelWithProjection``)
    and tokenizer, ``None`` for one-encoder families. ``zero_empty_negative``: an empty negative
    prompt is all-zero conditioning rather than the encoded empty string (SDXL's
    ``force_zeros_for_empty_prompt``, on for SDXL base).
    """

    unet: torch.nn.Module = field(repr=False)
    vae: torch.nn.Module = field(repr=False)
    text_encoder: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    scheduler: object = field(repr=False)
    name: str
    source: str
    fingerprint: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    text_encoder_2: torch.nn.Module | None = field(default=None, repr=False)
    tokenizer_2: object = field(default=None, repr=False)
    zero_empty_negative: bool = False

    @property
    def family(self) -> str:
        """``"sdxl"`` (two text encoders, added conditions) or ``"sd"`` (SD 1.x/2.x and alike)."""
        return SDXL if self.text_encoder_2 is not None else SD

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``epsilon`` (SD 1.x, SD 2.x base, SDXL) or ``v_prediction``
        (SD 2.x 768-v). Schedulers built from ``scheduler.config`` follow it."""
        return str(getattr(self.scheduler.config, "prediction_type", "epsilon"))

    @property
    def max_tokens(self) -> int:
        tokenizers = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]
        return min([int(t.model_max_length) for t in tokenizers] + [MAX_TOKENS])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling_factor(self) -> float:
        # SD 1.x/2.x: 0.18215, SDXL: 0.13025; always read it from the VAE config, never hard-code it
        return float(self.vae.config.scaling_factor)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor × the UNet's downsamplings."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the UNet was built for (512 for SD 1.5, 768 for SD 2.x-v, 1024 for SDXL)."""
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def text_width(self) -> int:
        """Width of the conditioning states (SDXL: both encoders' widths, concatenated)."""
        return sum(int(te.config.hidden_size) for te in (self.text_encoder, self.text_encoder_2) if te is not None)

    def _tokenize(self, tokenizer, prompts: list[str]):
        return tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt")

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        """The UNet's text conditioning for ``prompts``, padded/truncated to ``max_tokens``.

        One encoder (SD 1.x/2.x): its last hidden state, as in diffusers' SD pipelines; the
        attention mask is passed only when the text encoder's config sets ``use_attention_mask``
        (CLIP does not; nor does the embedded backbone, whose UNet was trained on unmasked MiniLM
        states). SDXL: both encoders' penultimate hidden states concatenated along the width, and
        the second encoder's projected pooled embedding. Its two tokenizers share the CLIP BPE
        vocabulary and differ only in padding; they must split every prompt alike, or a token
        position would mean one token in the first encoder's states and another in the second's.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        enc = self._tokenize(self.tokenizer, prompts)
        input_ids = enc.input_ids.to(self.device)
        if self.text_encoder_2 is None:
            kwargs = {}
            if getattr(self.text_encoder.config, "use_attention_mask", False) and "attention_mask" in enc:
                kwargs["attention_mask"] = enc.attention_mask.to(self.device)
            out = self.text_encoder(input_ids=input_ids, **kwargs)
            return PromptEmbeddings(out[0].to(self.dtype), input_ids)
        enc_2 = self._tokenize(self.tokenizer_2, prompts)
        self._check_same_tokens(prompts, enc, enc_2)
        first = self.text_encoder(input_ids=input_ids, output_hidden_states=True)
        second = self.text_encoder_2(input_ids=enc_2.input_ids.to(self.device), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return PromptEmbeddings(states.to(self.dtype), input_ids, second.text_embeds.to(self.dtype))

    def _check_same_tokens(self, prompts, enc, enc_2) -> None:
        for i, prompt in enumerate(prompts):
            ids = enc.input_ids[i][enc.attention_mask[i].bool()].tolist()
            ids_2 = enc_2.input_ids[i][enc_2.attention_mask[i].bool()].tolist()
            if ids != ids_2:
                raise DatasetdmError(
                    f"{self.source}: tokenizer and tokenizer_2 split {prompt!r} differently ({len(ids)} vs "
                    f"{len(ids_2)} tokens); SDXL's two encoders must see the same tokens, or class-token "
                    "positions found with the first would not line up with the second encoder's states"
                )

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states (B, T, D) and the first tokenizer's input ids (B, T); see ``embed_prompts``."""
        emb = self.embed_prompts(prompts)
        return emb.states, emb.input_ids

    def negative_embeddings(self, negative_prompt: str, batch: int) -> PromptEmbeddings:
        """The unconditional half of classifier-free guidance: ``negative_prompt`` encoded, or zeros
        when it is empty and the model asks for that (``zero_empty_negative``, SDXL)."""
        emb = self.embed_prompts([negative_prompt] * batch)
        if negative_prompt or not self.zero_empty_negative:
            return emb
        return PromptEmbeddings(torch.zeros_like(emb.states), emb.input_ids, torch.zeros_like(emb.pooled))

    def unet_conditioning(self, emb: PromptEmbeddings, image_size: tuple[int, int]) -> dict:
        """Keyword arguments of ``unet(latents, t, **kwargs)`` for images of ``image_size`` (H, W).

        SDXL's added conditions: the pooled text embedding and the time ids (original size, crop
        top-left, target size), here the generated size uncropped, as the SDXL pipeline's defaults.
        """
        kwargs = {"encoder_hidden_states": emb.states}
        if self.family == SDXL:
            h, w = (int(v) for v in image_size)
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": time_ids.expand(emb.states.shape[0], -1)}
        return kwargs

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def __post_init__(self) -> None:
        use_sdpa(self.unet, self.vae)

    def to(self, device=None, dtype=None) -> "Backbone":
        """Move to ``device`` (``auto``, ``cpu``, ``cuda``…) in ``dtype`` (``fp16``, ``bf16``, ``fp32`` or a torch dtype)."""
        from datasetdm.backbone.device import resolve_device, resolve_dtype

        device = resolve_device(device) if device is not None else self.device
        dtype = resolve_dtype(dtype, device) if dtype is not None else self.dtype
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is None:
                continue
            # SDXL's VAE overflows in float16 (its config says force_upcast): it stays in float32,
            # as diffusers' SDXL pipeline does
            want = torch.float32 if m is self.vae and self._vae_upcast(dtype) else dtype
            m.to(device=device)
            if m.dtype != want:
                m.to(dtype=want)
        self.device, self.dtype = device, dtype
        return self

    def _vae_upcast(self, dtype: torch.dtype) -> bool:
        return self.family == SDXL and dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", True))


def use_sdpa(*modules) -> int:
    """Give every attention layer of ``modules`` PyTorch's scaled-dot-product attention
    (diffusers' ``AttnProcessor2_0``: fused flash / memory-efficient kernels, no (hw × hw) map
    materialised) where it has diffusers' plain ``AttnProcessor``, which builds the full
    probability matrix. diffusers already picks SDPA under torch 2; this keeps it so for models
    saved or built otherwise. Layers with any other processor (LoRA, IP-Adapter…) are left as
    they are. Returns how many layers were switched."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    switched = 0
    for module in modules:
        if module is None:
            continue
        for layer in module.modules():
            if isinstance(layer, Attention) and type(layer.get_processor()) is AttnProcessor:
                layer.set_processor(AttnProcessor2_0())
                switched += 1
    return switched


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it (open_clip would pull torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetdmError(f"package {package!r} is not installed (pip install it into this environment)")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class PackageRef:
    """A component folder's ``package.json``: the component is a subfolder of an installed package."""

    __pydantic_config__ = STRICT

    package: str
    subfolder: str = ""


def _component_dir(root: Path, name: str) -> Path:
    """The folder to load a component from; follows ``package.json`` to an installed package."""
    folder = root / name
    if not folder.is_dir():
        raise DatasetdmError(f"{folder}: missing component folder {name!r} (a diffusers folder needs {', '.join(COMPONENTS)})")
    ref_file = folder / "package.json"
    if not ref_file.is_file():
        return folder
    # the embedded backbone does not commit MiniLM; it points at the installed PyPI package
    ref = read_config(PackageRef, ref_file)
    target = package_dir(ref.package) / ref.subfolder
    if not target.is_dir():
        raise DatasetdmError(f"{ref_file}: {target} does not exist in package {ref.package!r}")
    return target


def _sample_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Size plus a hash of the first and last MiB of a file (weights differ there too)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(chunk, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()


def _folder_fingerprint(root: Path, dirs: dict[str, Path]) -> str:
    """Hash of component configs and weight files: cheap (reads 2 MiB per file), stable across copies.

    Sizes alone would not tell two checkpoints of one architecture apart (e.g. a fine-tune).
    SDXL's second encoder and tokenizer are hashed after the others, so the fingerprints of
    one-encoder models stay what they were before SDXL was supported.
    """
    h = hashlib.sha256()
    for name in COMPONENTS + tuple(c for c in SDXL_COMPONENTS if c in dirs):
        folder = dirs[name]
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            rel = f.relative_to(folder).as_posix()
            if f.suffix == ".json":
                try:  # canonical form, so re-saving with other indentation does not change it
                    cfg = json.loads(f.read_text())
                    if isinstance(cfg, dict):
                        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
                    payload = json.dumps(cfg, sort_keys=True)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    payload = str(f.stat().st_size)
            else:
                payload = _sample_digest(f)
            h.update(f"{name}/{rel}:{payload}\n".encode())
    return h.hexdigest()[:16]


def _resolve_source(source) -> tuple[Path, str, str | None]:
    """(local folder, printable source, hub id or None) for a folder path, hub id or None (embedded).

    For a hub id the folder holds only the configs at first (``_hub_snapshot(..., weights=False)``),
    so an unsupported model is refused before gigabytes of weights are fetched.
    """
    if source is None:
        root = embedded_backbone_path()
        if not (root / "model_index.json").is_file():
            raise DatasetdmError(
                f"{root}: the embedded backbone is not trained yet (no model_index.json); "
                "pass a diffusers-format folder or hub id instead"
            )
        return root, "embedded", None
    root = Path(source).expanduser()
    if root.exists():
        return root, str(source), None
    text = str(source)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and os.sep not in text.replace("/", "")
    if not looks_like_hub_id:
        raise DatasetdmError(f"{text}: no such folder")
    return _hub_snapshot(text, weights=False), text, text


def _hub_snapshot(repo_id: str, weights: bool = True) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    # only the diffusers-format parts; SD repos also carry multi-GB single-file checkpoints
    parts = COMPONENTS + SDXL_COMPONENTS
    patterns = ["model_index.json"] + ([f"{c}/*" for c in parts] if weights else [f"{c}/*.json" for c in parts])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        if offline:
            raise DatasetdmError(
                f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it where there is network, or pass a local diffusers folder"
            ) from None
        raise DatasetdmError(f"{repo_id}: could not be downloaded from the Hugging Face hub") from None
    except Exception as e:  # repository not found, gated, network down
        raise DatasetdmError(f"{repo_id}: could not be fetched from the Hugging Face hub ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------ families

SUPPORTED = "supported: SD 1.x, SD 2.x (epsilon or v-prediction) and SDXL text-to-image models in diffusers layout"
_NO_UP_BLOCKS = "which has no UNet up blocks to take multi-scale hypercolumns from"

# model_index.json class-name prefixes of pipelines whose denoiser is a transformer
_TRANSFORMER_PIPELINES = (
    ("StableDiffusion3", "Stable Diffusion 3", "an MMDiT transformer"),
    ("Flux", "Flux", "a rectified-flow transformer"),
    ("PixArt", "PixArt", "a diffusion transformer (DiT)"),
    ("Sana", "Sana", "a linear-attention diffusion transformer"),
    ("HunyuanDiT", "Hunyuan-DiT", "a diffusion transformer (DiT)"),
    ("Lumina", "Lumina", "a diffusion transformer (DiT)"),
    ("AuraFlow", "AuraFlow", "an MMDiT transformer"),
    ("CogView", "CogView", "a diffusion transformer (DiT)"),
    ("QwenImage", "Qwen-Image", "an MMDiT transformer"),
    ("HiDream", "HiDream", "a diffusion transformer (DiT)"),
    ("DiTPipeline", "DiT", "a class-conditional diffusion transformer"),
)
# ... and of UNet variants that need more than a prompt and the noisy latent
_VARIANT_PIPELINES = (
    ("Inpaint", "inpainting", "its UNet also takes a mask and the masked image's latents (9 input channels)"),
    ("InstructPix2Pix", "instruct-pix2pix", "its UNet also takes the input image's latents (8 input channels)"),
    ("Depth2Img", "depth-to-image", "its UNet also takes a depth map (5 input channels)"),
    ("Upscale", "upscaler", "its UNet also takes the low-resolution image and a noise level"),
    ("UnCLIP", "unCLIP", "its UNet is conditioned on image embeddings"),
    ("Kandinsky", "Kandinsky", "its UNet is conditioned on image embeddings from a prior"),
    ("Cascade", "Stable Cascade", "its denoisers are not SD-format UNets"),
)
# UNet input channels beyond the latent's, when model_index.json names a plain pipeline
_EXTRA_INPUT = {
    5: "an inpainting UNet (mask and masked-image latents as extra input)",
    4: "an instruct-pix2pix UNet (the input image's latents as extra input)",
    3: "an upscaler UNet (the low-resolution image as extra input)",
    1: "a depth-to-image UNet (a depth map as extra input)",
}


def _unsupported(root: Path, family: str, cls: str, why: str) -> DatasetdmError:
    return DatasetdmError(f"{root}: {family} ({cls}) is not supported: {why}; {SUPPORTED}")


def _check_pipeline(root: Path, index: dict) -> None:
    """Refuse, from model_index.json alone, the pipelines whose models the capture cannot read."""
    cls = str(index.get("_class_name") or "?")
    for prefix, family, denoiser in _TRANSFORMER_PIPELINES:
        if cls.startswith(prefix):
            raise _unsupported(root / "model_index.json", family, cls, f"its denoiser is {denoiser}, {_NO_UP_BLOCKS}")
    for fragment, variant, why in _VARIANT_PIPELINES:
        if fragment in cls:
            raise _unsupported(root / "model_index.json", f"the {variant} variant", cls, why)
    entry = index.get("unet")
    if not entry or entry[0] is None:
        transformer = (index.get("transformer") or [None, None])[1]
        if transformer:
            raise _unsupported(root / "model_index.json", "a transformer model", cls,
                               f"its denoiser is {transformer}, {_NO_UP_BLOCKS}")
    elif entry[1] != "UNet2DConditionModel":
        raise _unsupported(root / "model_index.json", f"a {entry[1]} model", cls,
                           "only UNet2DConditionModel has the SD block layout whose up blocks give hypercolumns")
    if "StableDiffusionXL" in cls and not (index.get("text_encoder") or [None])[0]:
        # the refiner has only the second encoder and aesthetic-score time ids
        raise _unsupported(root / "model_index.json", "the SDXL refiner", cls,
                           "it has no first text encoder and is conditioned on aesthetic scores; use SDXL base")


def _check_unet(unet_dir: Path, unet_cfg: dict, vae_cfg: dict, cls: str) -> str:
    """The family of a UNet config (``SD`` or ``SDXL``), or a DatasetdmError saying why it cannot be used."""
    where = unet_dir / "config.json"
    latent = int(vae_cfg.get("latent_channels", 4))
    inputs = int(unet_cfg.get("in_channels", latent))
    if inputs != latent:
        what = _EXTRA_INPUT.get(inputs - latent, "a UNet that takes more than the noisy latent")
        raise _unsupported(where, what, cls, f"in_channels {inputs} but the VAE's latents have {latent}; "
                           "generation from noise and real-image capture give it the latent alone")
    added = unet_cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise _unsupported(where, f"a UNet with addition_embed_type {added!r}", cls,
                           "only SDXL's text_time added conditions are supplied")
    if unet_cfg.get("class_embed_type") is not None:
        raise _unsupported(where, f"a UNet with class_embed_type {unet_cfg['class_embed_type']!r}", cls,
                           "it needs a class or noise-level label that text-to-image generation does not give")
    if unet_cfg.get("time_cond_proj_dim") is not None:
        raise _unsupported(where, "a guidance-distilled UNet (time_cond_proj_dim, LCM)", cls,
                           "it needs a guidance-scale embedding that this loop does not supply")
    return SDXL if added == "text_time" else SD


def _text_width(cfg: dict):
    return cfg.get("hidden_size") or cfg.get("text_config", {}).get("hidden_size")


def _check_widths(dirs: dict[str, Path], unet_cfg: dict, family: str) -> None:
    """Text widths against the UNet's cross_attention_dim (and SDXL's added-embedding width)."""
    cross = unet_cfg.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    te_cfg = read_json(dirs["text_encoder"] / "config.json")
    if family == SD:
        width = _text_width(te_cfg)
        if width != cross:
            raise DatasetdmError(
                f"{dirs['text_encoder']}: text width {width} does not match the UNet's cross_attention_dim {cross} "
                f"({dirs['unet'] / 'config.json'})"
            )
        return
    te2_cfg = read_json(dirs["text_encoder_2"] / "config.json")
    width, width_2 = _text_width(te_cfg), _text_width(te2_cfg)
    if (width or 0) + (width_2 or 0) != cross:
        raise DatasetdmError(
            f"{dirs['text_encoder']}, {dirs['text_encoder_2']}: text widths {width} + {width_2} do not add up to "
            f"the UNet's cross_attention_dim {cross} ({dirs['unet'] / 'config.json'})"
        )
    # add_embedding reads 6 time ids (original size, crop, target size) and the pooled embedding
    expected = unet_cfg.get("projection_class_embeddings_input_dim")
    got = 6 * int(unet_cfg.get("addition_time_embed_dim") or 0) + int(te2_cfg.get("projection_dim") or 0)
    if expected != got:
        raise DatasetdmError(
            f"{dirs['unet'] / 'config.json'}: projection_class_embeddings_input_dim {expected}, but 6 time ids × "
            f"addition_time_embed_dim {unet_cfg.get('addition_time_embed_dim')} + text_encoder_2's projection_dim "
            f"{te2_cfg.get('projection_dim')} = {got} (an SDXL refiner, or mismatched components)"
        )


def _transformers_class(index: dict, name: str):
    """A text encoder class from model_index.json (CLIPTextModel, BertModel…), AutoModel otherwise."""
    import transformers

    entry = index.get(name) or [None, None]
    cls = getattr(transformers, str(entry[1]), None) if entry[0] == "transformers" else None
    return cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _load_unet(folder: Path, dtype: torch.dtype):
    """The UNet in ``dtype``. Weights stored in one safetensors file of another dtype are cast one
    tensor at a time, each read through its own ``safe_open``: diffusers' ``from_pretrained``
    memory-maps the whole file, and the cast makes every page of it resident beside the new copy
    until the last tensor is copied (SD 1.5 fp16 → bf16: +1.7 GB at the peak; SDXL: +5 GB).
    Anything else (the file's own dtype, sharded or .bin weights, keys the config does not build)
    goes through ``from_pretrained`` unchanged."""
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError, safe_open

    def pretrained():
        # dtype at load time (casting afterwards makes diffusers warn); low_cpu_mem_usage needs accelerate
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)

    file = folder / "diffusion_pytorch_model.safetensors"
    if not file.is_file():
        return pretrained()
    try:
        with safe_open(file, "pt") as f:
            stored = {k: _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype()) for k in f.keys()}
    except SafetensorError:
        return pretrained()  # a broken file: diffusers' error names it
    if set(stored.values()) <= {dtype}:
        return pretrained()  # nothing to cast: the mapped pages are the weights
    with torch.device("meta"):  # built without memory; allocated (untouched) in dtype below
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    # torch's own cast of the empty meta tensors (diffusers' ``to`` warns about casting after a load)
    torch.nn.Module.to(unet, dtype)
    state = unet.state_dict(keep_vars=True)
    if set(state) != set(stored) or any(name not in state for name, _ in unet.named_buffers()):
        return pretrained()  # a layout the config does not build as stored (or a buffer not saved)
    unet.to_empty(device="cpu")
    state = unet.state_dict()
    try:
        with torch.no_grad():
            for key, target in state.items():
                with safe_open(file, "pt") as f:  # unmapped once this tensor is copied
                    target.copy_(f.get_tensor(key))
    except SafetensorError as e:
        raise OSError(f"{file}: {e}") from None
    return unet.eval()


def load_backbone(source: str | Path | None = None, device="cpu", dtype: torch.dtype | str | None = None) -> Backbone:
    """Load a diffusers-format model (folder or hub id); ``None`` loads the embedded backbone.

    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``dtype``:
    ``fp16``/``bf16``/``fp32`` or a torch dtype, by default fp16 on CUDA and fp32 elsewhere
    (``backbone.device.placement``). Every attention layer runs PyTorch's scaled-dot-product
    attention (``use_sdpa``); capture wraps only the layers whose maps it reads.

    The model is frozen (eval mode, no gradients). Raises ``DatasetdmError`` naming the problem,
    from the configs, before any weights are read: an unsupported family or variant (see the
    module doc), a missing component folder, a text encoder whose width does not match the UNet's
    ``cross_attention_dim``, or a hub id that is not cached while offline.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL

    from datasetdm.backbone.device import placement

    device, dtype = placement(device, dtype)  # checked before anything is read
    root, printable, hub_id = _resolve_source(source)
    index = read_json(root / "model_index.json")
    cls = str(index.get("_class_name") or "?")
    _check_pipeline(root, index)
    # the UNet and VAE configs decide the family, so they are read before the other components
    dirs = {name: _component_dir(root, name) for name in ("unet", "vae")}
    unet_cfg = read_json(dirs["unet"] / "config.json")
    vae_cfg = read_json(dirs["vae"] / "config.json")
    family = _check_unet(dirs["unet"], unet_cfg, vae_cfg, cls)
    names = COMPONENTS + (SDXL_COMPONENTS if family == SDXL else ())
    dirs.update({name: _component_dir(root, name) for name in names if name not in dirs})
    _check_widths(dirs, unet_cfg, family)

    sched_cfg = read_json(dirs["scheduler"] / "scheduler_config.json")
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name")), None)
    if sched_cls is None or not hasattr(sched_cls, "from_pretrained"):
        raise DatasetdmError(f"{dirs['scheduler']}: unknown scheduler class {sched_cfg.get('_class_name')!r}")

    if hub_id is not None:  # the configs pass: now the weights
        root = _hub_snapshot(hub_id)
        dirs = {name: _component_dir(root, name) for name in dirs}
    try:
        unet = _load_unet(dirs["unet"], dtype)
        upcast = family == SDXL and dtype == torch.float16 and vae_cfg.get("force_upcast", True)
        vae_dtype = torch.float32 if upcast else dtype  # see Backbone.to
        vae = AutoencoderKL.from_pretrained(dirs["vae"], torch_dtype=vae_dtype, low_cpu_mem_usage=False)
        text_encoder = _transformers_class(index, "text_encoder").from_pretrained(dirs["text_encoder"], dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["tokenizer"])
        scheduler = sched_cls.from_pretrained(dirs["scheduler"])
        extra = {}
        if family == SDXL:
            extra["text_encoder_2"] = _transformers_class(index, "text_encoder_2").from_pretrained(
                dirs["text_encoder_2"], dtype=dtype)
            extra["tokenizer_2"] = transformers.AutoTokenizer.from_pretrained(dirs["tokenizer_2"])
            # SDXL base's pipeline config: an empty negative prompt means zero conditioning
            extra["zero_empty_negative"] = bool(index.get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError, EnvironmentError) as e:
        raise DatasetdmError(f"{root}: could not load a component ({e})") from None

    for m in (unet, vae, text_encoder, extra.get("text_encoder_2")):
        if m is not None:
            m.eval().requires_grad_(False)
    name = root.name if source is not None else "embedded"
    bb = Backbone(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        name=name, source=printable, fingerprint=_folder_fingerprint(root, dirs), dtype=dtype, **extra,
    )
    return bb.to(device)
