"""Decoder checkpoints: a directory with ``model.safetensors`` and ``config.json``.

Written atomically as a whole: files go to a hidden sibling directory that is renamed onto the
target only when complete, so an interrupted or failed run leaves the previous checkpoint (or none),
never a half-written one. The config names the task, the classes, the backbone's fingerprint and
the decoder's hyperparameters; loading for another task or with another backbone is refused,
because the decoder's weights only mean something for the features they were trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from datasetdm.decoder.build import DecoderConfig, PDecoder, build_decoder
from datasetdm.errors import DatasetdmError

FORMAT = "datasetdm-decoder"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EXTRA_PREFIX = "extra."  # non-parameter tensors stored with the weights (open-vocab text embeddings)


def save_decoder(decoder: PDecoder, path, extra_tensors: dict | None = None, info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in decoder.state_dict().items()}
        for k, v in (extra_tensors or {}).items():
            tensors[EXTRA_PREFIX + k] = v.detach().contiguous().cpu().float()
        save_file(tensors, tmp / WEIGHTS)
        config = {"format": FORMAT, "version": VERSION, "decoder": decoder.cfg.to_dict(), "info": info or {}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path) -> dict:
    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir() or not cfg_path.is_file():
        raise DatasetdmError(f"{path}: not a decoder checkpoint (expected a folder with {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetdmError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "decoder" not in config:
        raise DatasetdmError(f"{cfg_path}: not a {FORMAT} config")
    if config.get("version", 0) > VERSION:
        raise DatasetdmError(f"{cfg_path}: format version {config['version']} is newer than this datasetdm ({VERSION})")
    return config


def check_compatible(path, cfg: DecoderConfig, task: str | None = None, backbone_fingerprint: str | None = None):
    if task is not None and cfg.task != task:
        raise DatasetdmError(f"{path}: decoder was trained for task {cfg.task!r}, not {task!r}")
    if backbone_fingerprint is not None:
        mine = cfg.backbone.get("fingerprint")
        if mine != backbone_fingerprint:
            raise DatasetdmError(
                f"{path}: decoder was trained on backbone {cfg.backbone.get('source') or '?'} "
                f"(fingerprint {mine}), not on the one given (fingerprint {backbone_fingerprint}); "
                "its weights only fit the features they were trained on — retrain it with `datasetdm train`"
            )


def load_decoder(
    path, task: str | None = None, backbone_fingerprint: str | None = None, map_location="cpu"
) -> tuple[PDecoder, dict[str, torch.Tensor], dict]:
    """Load a checkpoint → (decoder in eval mode, extra tensors, config JSON).

    ``task`` / ``backbone_fingerprint``: refuse a checkpoint made for another task or backbone.
    """
    path = Path(path)
    config = read_config(path)
    cfg = DecoderConfig.from_dict(config["decoder"])
    check_compatible(path, cfg, task, backbone_fingerprint)
    try:
        tensors = load_file(path / WEIGHTS, device=str(map_location))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise DatasetdmError(f"{path / WEIGHTS}: unreadable ({e})") from None
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        decoder = build_decoder(cfg)
        decoder.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise DatasetdmError(f"{path / WEIGHTS}: weights do not match {CONFIG} ({str(e).splitlines()[0]})") from None
    decoder.eval()
    return decoder, extra, config
