"""kill -9 at random points of `train`, `generate` and `export`, then a rerun (issue 18).

Each command runs in a child process (forked from this one, so it starts at once: the imports are
done) and gets SIGKILL at a random point of the part of the run that writes: from the moment its
output appears (the lock beside the output folder for generate and export, `{out}.work` for
train: before it, train only loads the backbone and computes features) to the end of an
uninterrupted run. What the kill leaves must be nothing or something complete; the same command
run again (with --resume for generate: its contract) must then end with output identical to the
uninterrupted run's: the bytes of every shard and exported file, the tensors of the checkpoint.
Three points per command in the default run, twenty in the slow one.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from datasetdm.formats.labelled_folder import read_labelled_folder
from datasetdm.formats.shards import read_manifest
from datasetdm.world.render import render_scene
from faults_support import leftovers, run_cli, tree_bytes, write_folder, write_shard_run

DEFAULT_POINTS, SLOW_POINTS = 3, 20


def fork_cli(*args) -> int:
    """Start ``datasetdm ARGS`` in a forked child (its output discarded); return its pid."""
    pid = os.fork()
    if pid == 0:  # the child: run the command's entry point, never return into pytest
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            sys.argv = ["datasetdm", *map(str, args)]
            from datasetdm.cli import main

            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        finally:
            os._exit(code)
    return pid


def wait_for(started, pid: int) -> int | None:
    """Poll until ``started()`` holds (None) or the child has exited (its wait status: it was quicker)."""
    while not started():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.001)
    return None


def kill_after(delay: float, started, *args) -> None:
    """Run ``datasetdm ARGS`` in a child; SIGKILL it ``delay`` seconds after its output appears."""
    pid = fork_cli(*args)
    if wait_for(started, pid) is None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # a child that already finished is a zombie: the signal is harmless
        os.waitpid(pid, 0)


def kill_points(name: str, seconds: float, count: int) -> list[float]:
    """``count`` seeded random delays spread over the ``seconds`` a run spends writing."""
    rng = random.Random(f"kill-{name}")
    return [rng.uniform(0.0, 1.0) * seconds for _ in range(count)]


class Reference:
    """An uninterrupted run of a command: its output folder and how long it writes."""

    def __init__(self, out: Path, seconds: float):
        self.out, self.seconds = out, seconds


def reference(started, out: Path, *args) -> Reference:
    """The uninterrupted run, in a child like the killed ones; timed from its output's appearing
    (from its start when it was over before this process saw the output: a busy machine)."""
    t0 = time.perf_counter()
    pid = fork_cli(*args)
    status = wait_for(started, pid)
    if status is None:
        t0 = time.perf_counter()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"datasetdm {' '.join(map(str, args))} failed"
    return Reference(out, time.perf_counter() - t0)


def lock_appears(out: Path):
    from datasetdm.io import lock_file

    return lock_file(out).exists


def work_appears(out: Path):
    return (out.parent / f"{out.name}.work").exists


# --------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("kill-world") / "world", [render_scene("train", 0, i) for i in range(2)])


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory) -> Path:
    return write_shard_run(tmp_path_factory.mktemp("kill-run") / "run", 24, samples_per_shard=4)


def train_args(world, backbone, out):
    return ["train", "--data", world, "--task", "semantic", "--out", out, "--backbone", backbone, "--n-images", "2",
            "--views", "1", "--iterations", "6", "--batch-size", "2", "--checkpoint-every", "2", "--no-progress"]


def generate_args(backbone, out):
    return ["generate", "--labeler", "attention", "--classes", "ball,person", "--backbone", backbone, "--out", out,
            "--n", "6", "--samples-per-shard", "2", "--batch-size", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def train_reference(world, tiny_clip_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-train-ref") / "ckpt"
    return reference(work_appears(out), out, *train_args(world, tiny_clip_path, out))


@pytest.fixture(scope="module")
def generate_reference(tiny_clip_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-gen-ref") / "gen"
    return reference(lock_appears(out), out, *generate_args(tiny_clip_path, out))


@pytest.fixture(scope="module")
def export_reference(shard_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-export-ref") / "export"
    return reference(lock_appears(out), out, "export", shard_run, "--out", out)


# --------------------------------------------------------------------- the checks


def check_train(ref: Reference, delay: float, world, backbone, parent: Path, capsys, monkeypatch) -> None:
    import torch
    from safetensors.torch import load_file

    from datasetdm.decoder.checkpoint import is_checkpoint

    out = parent / "ckpt"
    kill_after(delay, work_appears(out), *train_args(world, backbone, out))
    assert not out.exists() or is_checkpoint(out), "a killed train left a half-written checkpoint"
    if not out.exists():  # the contract: the same command continues from {out}.work
        code, _, err = run_cli(capsys, monkeypatch, *train_args(world, backbone, out))
        assert code == 0, err
        assert not (parent / "ckpt.work").exists()
        assert sorted(p.name for p in parent.iterdir()) == ["ckpt"], leftovers(parent)
    a, b = load_file(ref.out / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"weights differ after a kill at {delay:.2f}s"


def check_generate(ref: Reference, delay: float, backbone, parent: Path, capsys, monkeypatch) -> None:
    out = parent / "gen"
    kill_after(delay, lock_appears(out), *generate_args(backbone, out))
    code, _, err = run_cli(capsys, monkeypatch, *generate_args(backbone, out), "--resume")
    assert code == 0, err
    assert sorted(p.name for p in parent.iterdir()) == ["gen"] and leftovers(out) == []
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == sorted(p.name for p in (ref.out / "shards").iterdir())
    for name in shards:
        assert (out / "shards" / name).read_bytes() == (ref.out / "shards" / name).read_bytes(), \
            f"{name} differs after a kill at {delay:.2f}s"
    assert read_manifest(out).to_pylist() == read_manifest(ref.out).to_pylist()


def check_export(ref: Reference, delay: float, shard_run, parent: Path, capsys, monkeypatch) -> None:
    out = parent / "export"
    kill_after(delay, lock_appears(out), "export", shard_run, "--out", out)
    if out.exists():  # the kill came after the rename: complete, and a rerun would say so
        read_labelled_folder(out).validate()
    else:  # no images without annotations.json: no folder at all; the rerun needs no deletion
        code, _, err = run_cli(capsys, monkeypatch, "export", shard_run, "--out", out)
        assert code == 0, err
        assert sorted(p.name for p in parent.iterdir()) == ["export"], leftovers(parent)
    assert tree_bytes(out) == tree_bytes(ref.out), f"export differs after a kill at {delay:.2f}s"


# --------------------------------------------------------------------- default run: 3 points each


@pytest.mark.parametrize("point", range(DEFAULT_POINTS))
def test_train_killed_then_rerun(point, train_reference, world, tiny_clip_path, tmp_path, capsys, monkeypatch):
    delay = kill_points("train", train_reference.seconds, DEFAULT_POINTS)[point]
    check_train(train_reference, delay, world, tiny_clip_path, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("point", range(DEFAULT_POINTS))
def test_generate_killed_then_resumed(point, generate_reference, tiny_clip_path, tmp_path, capsys, monkeypatch):
    delay = kill_points("generate", generate_reference.seconds, DEFAULT_POINTS)[point]
    check_generate(generate_reference, delay, tiny_clip_path, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("point", range(DEFAULT_POINTS))
def test_export_killed_then_rerun(point, export_reference, shard_run, tmp_path, capsys, monkeypatch):
    delay = kill_points("export", export_reference.seconds, DEFAULT_POINTS)[point]
    check_export(export_reference, delay, shard_run, tmp_path, capsys, monkeypatch)


# --------------------------------------------------------------------- slow run: 20 points each


@pytest.mark.slow
def test_twenty_kills_of_each_command(train_reference, generate_reference, export_reference, world, shard_run,
                                      tiny_clip_path, tmp_path, capsys, monkeypatch):
    for k, delay in enumerate(kill_points("slow-train", train_reference.seconds, SLOW_POINTS)):
        (tmp_path / f"t{k}").mkdir()
        check_train(train_reference, delay, world, tiny_clip_path, tmp_path / f"t{k}", capsys, monkeypatch)
    for k, delay in enumerate(kill_points("slow-generate", generate_reference.seconds, SLOW_POINTS)):
        (tmp_path / f"g{k}").mkdir()
        check_generate(generate_reference, delay, tiny_clip_path, tmp_path / f"g{k}", capsys, monkeypatch)
    for k, delay in enumerate(kill_points("slow-export", export_reference.seconds, SLOW_POINTS)):
        (tmp_path / f"e{k}").mkdir()
        check_export(export_reference, delay, shard_run, tmp_path / f"e{k}", capsys, monkeypatch)
