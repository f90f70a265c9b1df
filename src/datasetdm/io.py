"""Small file helpers shared by every stage: atomic writes and per-sample seeds."""

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
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sample_seed(seed: int, sample_id: int, stream: str = "") -> int:
    """A 63-bit seed for one sample, derived from (run seed, sample id, stream name).

    Output then never depends on batch size, worker count or order of processing.
    """
    digest = hashlib.sha256(f"{seed}:{sample_id}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
