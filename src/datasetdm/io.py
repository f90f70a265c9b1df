"""Small file helpers shared by every stage: atomic writes, training state without pickle, and
per-sample seeds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and an interrupted run leaves the old file (or none).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are readable like any file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sample_seed(seed: int, sample_id: int, stream: str = "") -> int:
    """A 63-bit seed for one sample, derived from (run seed, sample id, stream name).

    Output then never depends on batch size, worker count or order of processing.
    """
    digest = hashlib.sha256(f"{seed}:{sample_id}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------ training state, no pickle
# A resumable run's state (model and optimizer state dicts, RNG states, counters) as one
# safetensors file: tensors as tensors, the rest as JSON in the file's metadata. Loading it never
# executes code, unlike a pickled torch.save file.


def save_state(path: str | os.PathLike, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _encode(state, "s", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"datasetdm_state": json.dumps(tree)})


def load_state(path: str | os.PathLike) -> dict:
    """The dict ``save_state`` wrote; a DatasetdmError naming the file when it is not one."""
    from safetensors import safe_open

    from datasetdm.errors import DatasetdmError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tree = json.loads(meta["datasetdm_state"])
    except Exception as e:  # missing file, no metadata, not safetensors: safetensors raises its own types
        raise DatasetdmError(f"{path}: not a datasetdm training state ({type(e).__name__}: {e})") from None
    return _decode(tree, tensors)


def _encode(obj, key: str, tensors: dict):
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: no shared storage in the file
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
        if all(isinstance(k, int) for k in obj):  # optimizer state is keyed by parameter index
            return {"__int_dict__": {str(k): _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
        raise TypeError(f"{key}: dict keys must be all str or all int")
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot store {type(obj).__name__} in a training state")


def _decode(tree, tensors: dict):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {k: _decode(v, tensors) for k, v in tree["__dict__"].items()}
        if "__int_dict__" in tree:
            return {int(k): _decode(v, tensors) for k, v in tree["__int_dict__"].items()}
        if "__list__" in tree:
            items = [_decode(v, tensors) for v in tree["__list__"]]
            return tuple(items) if tree.get("tuple") else items
    return tree
