"""Small file helpers shared by every stage: atomic writes (files and whole folders), the lock on
an output folder, training state without pickle, and per-sample seeds."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from datasetdm.errors import DatasetdmError


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
        with naming_path(path):
            yield tmp_path
        # mkstemp makes 0600, and some writers (safetensors) make their file anew with 0600 too:
        # set the mode last, so outputs are readable like any file the user's umask allows
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_atomic_temporaries(path: str | os.PathLike) -> None:
    """Remove what ``atomic_path`` writes of ``path`` and a kill -9 left behind before its rename.
    Only for a caller that holds the folder's ``output_lock``: no other writer is live."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_path(path: str | os.PathLike) -> Iterator[None]:
    """Give ``path`` to an OSError raised in the block without a file name: a ``write()`` that
    fails on a full disk names no file, and the user's one-line error must say which one."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


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


# ------------------------------------------------------------------ the lock on an output folder
# Two runs writing one folder corrupt each other (a second `generate --resume` deletes the first
# run's temporary shard). Every writing command holds an OS lock (flock) on a hidden file beside
# its output folder while it runs; the kernel drops it when the process ends, even on kill -9, so
# a stale lock never blocks a rerun. The file records who holds it, for the second run's error.

_held_locks: dict[Path, list] = {}  # lock file -> [fd, depth]: re-entrant within one process


def lock_file(out: str | os.PathLike) -> Path:
    """The lock file of output folder ``out``: ``.{name}.lock`` beside it (not inside: a folder
    built in a temporary sibling replaces ``out`` as a whole)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on output folder ``out`` for the block; a DatasetdmError naming the holder
    (pid, command, start time) when another process holds it. Re-entrant within a process, so a
    command and the library functions it calls may both take it."""
    path = lock_file(out)
    held = _held_locks.get(path)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    created = _missing_parents(path.parent)
    fd = _acquire(path, Path(out))
    _held_locks[path] = [fd, 1]
    try:
        yield
    finally:
        del _held_locks[path]
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a waiting process then sees a new inode and retries
        os.close(fd)
        for folder in created:  # parents made only for the lock file, left empty by a failed run
            with contextlib.suppress(OSError):
                folder.rmdir()


def _missing_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing  # deepest first, the order to remove them in


def _acquire(path: Path, out: Path) -> int:
    import fcntl

    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where a parent folder should be
            raise DatasetdmError(f"{out}: {os.strerror(errno.ENOTDIR)}") from None
        except OSError as err:
            raise DatasetdmError(f"{out}: {err.strerror}") from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise DatasetdmError(f"{out}: {err.strerror} (cannot create its lock file {path.name})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DatasetdmError(f"{out}: in use by another datasetdm run ({holder}); wait for it to finish "
                                 "or choose another output folder") from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: retry
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    record = {"pid": os.getpid(), "command": " ".join(argv)[:300],
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    return fd


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {record['pid']}, `{record['command']}`, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


# ------------------------------------------------------------------ folders built aside, then renamed


def sibling_temporaries(out: str | os.PathLike) -> list[Path]:
    """Temporary siblings ``atomic_folder`` left for ``out`` (a killed run's)."""
    out = Path(os.path.abspath(out))
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")))


def new_staging_folder(out: Path) -> Path:
    """A new hidden sibling of ``out`` to build it in, after removing the temporaries a killed
    earlier run (another process id) left. Call with ``out``'s lock held."""
    mine = f"-{os.getpid()}-"
    for stale in sibling_temporaries(out):
        if mine not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is readable like any folder
    return tmp


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden sibling folder of ``out`` to build the output in; when the block
    succeeds it replaces ``out`` (an existing ``out`` is moved aside, then removed), when it fails
    it is removed. Readers see the old folder or the complete new one, never a half-written one.

    Holds ``out``'s lock for the block, so the temporaries of a killed earlier run (another
    process id) are removed first. Whether an existing ``out`` may be replaced is the caller's
    decision, made before the block.
    """
    out = Path(out)
    with output_lock(out):
        tmp = new_staging_folder(out)
        try:
            yield tmp
            if out.exists() or out.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
