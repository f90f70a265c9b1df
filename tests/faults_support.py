"""Helpers of the fault tests (tests/test_faults*.py): their inputs (a labelled folder and a
generate run of world scenes, made without a model), run the CLI in this process, check its
one-line error, kill -9 a child at a chosen moment, disks that fail like a full or a read-only
one, and planted pickles."""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import pytest


def write_folder(path: Path, samples) -> Path:
    """A labelled folder of ``samples`` with the world's categories."""
    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.world.render import CATEGORIES

    with LabelledFolderWriter(path, list(CATEGORIES)) as writer:
        for sample in samples:
            writer.add(sample)
    return path


def write_shard_run(out: Path, n: int, samples_per_shard: int) -> Path:
    """A generate run's folder holding the first ``n`` world val scenes: no model needed."""
    from datasetdm.formats.shards import ShardWriter
    from datasetdm.world.render import CATEGORIES, render_scene

    with ShardWriter(out, list(CATEGORIES), {"seed": 0}, samples_per_shard=samples_per_shard) as writer:
        for i in range(n):
            scene = render_scene("val", 0, i)
            writer.add(i, {"prompt": scene.caption, "classes": [], "seed": i, "scores": {}}, scene)
    return out


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """``datasetdm ARGS`` as the installed command runs it (``datasetdm.cli.main``), in this process:
    (exit status, stdout, stderr)."""
    from datasetdm.cli import main

    monkeypatch.setattr(sys, "argv", ["datasetdm", *map(str, args)])
    monkeypatch.delenv("DATASETDM_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def assert_one_line_error(code: int, err: str, *fragments) -> str:
    """Exit status 2, exactly one ``error:`` line holding every fragment, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary or half-written things a failed run may leave in or beside a folder."""
    found = []
    for p in folder.rglob("*"):
        if p.name.endswith((".tmp",)) or ".tmp-" in p.name or ".old-" in p.name or ".partial-" in p.name:
            found.append(str(p.relative_to(folder)))
    return sorted(found)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ kill -9


def kill_when(command: list, ready: Callable[[], bool], watch: Callable[[int], None] | None = None,
              timeout: float = 120.0) -> None:
    """Run ``command`` in a child and SIGKILL it the moment ``ready()`` holds (polled every 10 ms),
    or at ``timeout``. ``watch(pid)`` is called at each poll and just before the kill (e.g. to
    note the child's descendants while they exist). Asserts the child was still running then
    (else fails with its stderr) and that it died of the kill; a child left over is killed."""
    child = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while child.poll() is None and time.monotonic() < deadline:
            if watch is not None:
                watch(child.pid)
            if ready():
                break
            time.sleep(0.01)
        assert child.poll() is None, child.stderr.read().decode()
        if watch is not None:
            watch(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL


# ------------------------------------------------------------------ failing disks


def _under(path, root: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(root)
    except TypeError:  # a file descriptor, not a path
        return False


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class _CountingFile:
    """A file object whose writes draw on the shared byte budget of a ``FullDisk``."""

    def __init__(self, f, disk: "FullDisk"):
        self._f, self._disk = f, disk

    def write(self, data):
        self._disk.spend(len(data))
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


class FullDisk:
    """Files opened for writing under ``root`` (and, with ``only``, whose path contains it) share
    ``budget`` bytes; a write past it raises ENOSPC without a file name, as the kernel's write(2)
    does. Python-level writes only (open, Path.write_*, tarfile, PIL): every write path of the
    shard and labelled-folder writers."""

    def __init__(self, monkeypatch, root: Path, budget: int, only: str = ""):
        self.root, self.left = Path(os.path.abspath(root)), budget
        real_open = io.open

        def counted(file, mode) -> bool:
            return _writes(mode) and _under(file, self.root) and only in os.fspath(file)

        def faulty_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _CountingFile(f, self) if counted(file, mode) else f

        for module, name in ((builtins, "open"), (io, "open"), (tarfile, "bltn_open")):
            monkeypatch.setattr(module, name, faulty_open)

    def spend(self, n: int) -> None:
        if n > self.left:
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= n


class ReadOnlyDisk:
    """Creating, writing or renaming anything under ``root`` fails with EROFS, as on a read-only
    mount; works when the tests run as root, where chmod does not bind."""

    def __init__(self, monkeypatch, root: Path):
        self.root = Path(os.path.abspath(root))
        real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
        real_replace, real_rename = os.replace, os.rename

        def refuse(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

        def faulty_open(file, mode="r", *args, **kwargs):
            if _writes(mode) and _under(file, self.root):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def faulty_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, self.root):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def faulty_mkdir(path, *args, **kwargs):
            if _under(path, self.root):
                if os.path.lexists(path):  # a read-only mount still answers "exists" first
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
                refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def faulty_move(real):
            def move(src, dst, *args, **kwargs):
                if _under(src, self.root) or _under(dst, self.root):
                    refuse(dst)
                return real(src, dst, *args, **kwargs)
            return move

        for module, name, fn in ((builtins, "open", faulty_open), (io, "open", faulty_open),
                                 (tarfile, "bltn_open", faulty_open), (os, "open", faulty_os_open),
                                 (os, "mkdir", faulty_mkdir), (os, "replace", faulty_move(real_replace)),
                                 (os, "rename", faulty_move(real_rename))):
            monkeypatch.setattr(module, name, fn)


# ------------------------------------------------------------------ planted pickles


class Payload:
    """Unpickling this creates ``marker``: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"step": 3, "payload": Payload(marker)}))
