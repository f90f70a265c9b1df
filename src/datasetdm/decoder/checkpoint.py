"""Decoder checkpoints: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` = ``{"format": "datasetdm-decoder", "version": 2, "decoder": DecoderConfig, "info": {...}}``:
the task, the categories (ids, names, keypoint names), the backbone (fingerprint, source, name) and
the decoder's hyperparameters; ``info`` records how it was trained. Open-vocabulary decoders keep
their categories' text embeddings in the weights (``head.text_embeddings``).

Written atomically as a whole: both files go to a hidden sibling directory that replaces the target
only when complete (``datasetdm.io.atomic_path`` does the same for single files), so an interrupted
or failed run leaves the previous checkpoint (or none), never a half-written one or a weights file
paired with another run's config. Loading for another task or with another backbone is refused:
the weights only mean something for the features they were trained on.

Versions: 2 names the transformer decoder's weights after ``decoder.transformer`` (plain torch);
version 1 used transformers' Mask2Former names, renamed on load (``transformer.upgrade_legacy_keys``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from datasetdm.decoder.build import DecoderConfig, PDecoder, build_decoder, check_backbone
from datasetdm.decoder.transformer import has_legacy_keys, upgrade_legacy_keys
from datasetdm.errors import DatasetdmError
from datasetdm.io import atomic_folder, atomic_path

FORMAT = "datasetdm-decoder"
VERSION = 2  # 2: the transformer decoder's own weight names (1: transformers' Mask2Former names)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def is_checkpoint(path) -> bool:
    try:
        read_config(path)
        return True
    except DatasetdmError:
        return False


def save_decoder(decoder: PDecoder, path, info: dict | None = None) -> Path:
    """Write ``decoder`` to the checkpoint directory ``path`` (replacing a previous checkpoint there).

    Refuses to replace anything that is not a decoder checkpoint (a data folder given as --out).
    Built in a temporary sibling that replaces ``path`` when complete (``io.atomic_folder``); the
    temporary of a save killed earlier is removed.
    """
    path = Path(path)
    if path.exists() and not is_checkpoint(path):
        raise DatasetdmError(f"{path}: exists and is not a decoder checkpoint; not overwriting it (choose another --out)")
    with atomic_folder(path) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in decoder.state_dict().items()}
        with atomic_path(tmp / WEIGHTS) as weights:  # safetensors writes 0600; atomic_path applies the umask
            save_file(tensors, weights, metadata={"format": FORMAT, "task": decoder.cfg.task})
        config = {"format": FORMAT, "version": VERSION, "decoder": decoder.cfg.to_dict(), "info": info or {}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_config(path) -> dict:
    """The checkpoint's config.json, checked to be one (a DatasetdmError naming the file if not)."""
    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir() or not cfg_path.is_file():
        raise DatasetdmError(f"{path}: not a decoder checkpoint (expected a folder with {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetdmError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("decoder"), dict):
        raise DatasetdmError(f"{cfg_path}: not a {FORMAT} config")
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise DatasetdmError(f"{cfg_path}: format version {config.get('version')!r} is not one this datasetdm reads (<= {VERSION})")
    return config


def decoder_config(path) -> DecoderConfig:
    try:
        return DecoderConfig.from_dict(read_config(path)["decoder"], f"{Path(path) / CONFIG}")
    except TypeError as e:
        raise DatasetdmError(f"{Path(path) / CONFIG}: incomplete decoder config ({e})") from None


def check_compatible(path, cfg: DecoderConfig, task: str | None = None, backbone=None) -> None:
    """Refuse a checkpoint trained for another ``task`` or on another ``backbone`` (a ``Backbone``
    or its fingerprint; raw-pixel decoders fit every backbone)."""
    if task is not None and cfg.task != task:
        raise DatasetdmError(f"{path}: decoder was trained for task {cfg.task!r}, not {task!r}")
    if backbone is not None:
        check_backbone(cfg, backbone, path)


def load_decoder(path, task: str | None = None, backbone=None, map_location="cpu") -> PDecoder:
    """Load a checkpoint directory → the decoder, in eval mode.

    ``task`` / ``backbone`` (a ``Backbone`` or fingerprint string): refuse a checkpoint made for
    another task or backbone. The decoder's ``cfg`` names its task and categories; its
    ``checkpoint`` holds config.json and ``checkpoint_path`` the directory (named in later errors).
    """
    path = Path(path)
    config = read_config(path)
    cfg = decoder_config(path)
    check_compatible(path, cfg, task, backbone)
    try:
        state = load_file(path / WEIGHTS, device=str(map_location))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise DatasetdmError(f"{path / WEIGHTS}: unreadable ({e})") from None
    try:
        if has_legacy_keys(state):  # a version-1 checkpoint: same weights, older names
            state = upgrade_legacy_keys(state)
        decoder = build_decoder(cfg)
        decoder.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise DatasetdmError(f"{path / WEIGHTS}: weights do not match {CONFIG} ({str(e).splitlines()[0]})") from None
    decoder.checkpoint_path = path
    decoder.checkpoint = config
    return decoder.to(map_location).eval()
