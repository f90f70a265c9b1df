"""`generate` on Ray workers (issue 19): the dataset depends on the sample ids only.

Two workers write the bytes the single process writes; a driver killed with -9 mid-run is finished
by `--resume --workers 1` into the same dataset, and its Ray processes go with it. The Ray tests are
slow-marked (`make test-slow` installs `.[ray]`) and skip without Ray: the default run installs
`.[dev]` only, since a local Ray start costs seconds and its raylet gives up when its helpers take
over 15 s to start, as on a machine starved by other jobs. The default run plays Ray Data's part
in this process instead (`test_workers_in_any_order_write_the_single_process_bytes`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from datasetdm.formats.shards import MANIFEST_FILE, read_manifest
from faults_support import assert_one_line_error, kill_when, run_cli

N, PER_SHARD, BATCH = 8, 2, 2


def generate_args(backbone, decoders, out, *extra) -> list:
    args = ["generate", "--backbone", backbone, "--out", out, "--n", N, "--samples-per-shard", PER_SHARD,
            "--batch-size", BATCH, "--steps", 2, "--device", "cpu", *extra]
    for d in decoders:
        args += ["--decoder", d]
    return args


def dataset(out: Path) -> tuple[dict, list]:
    """Every file of a run but the manifest (whose Parquet bytes may differ), and the manifest's rows."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != MANIFEST_FILE}
    return files, read_manifest(out).to_pylist()


@pytest.fixture(scope="module")
def decoders(tiny_clip, tmp_path_factory) -> list[Path]:
    """Random-weight semantic and depth decoders that fit the tiny backbone's features."""
    import torch

    from datasetdm.backbone.capture import generate
    from datasetdm.decoder import DecoderConfig, build_decoder
    from datasetdm.decoder.checkpoint import save_decoder

    images, hc = generate(tiny_clip, ["a photo of a dog"], [0], num_inference_steps=1, guidance_scale=1.0)
    folder = tmp_path_factory.mktemp("scaleout-decoders")
    paths = []
    for task in ("semantic", "depth"):
        cfg = DecoderConfig(
            task=task, categories=[{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
            feature_channels=[f.shape[1] for f in hc.features], feature_sizes=[list(f.shape[-2:]) for f in hc.features],
            image_size=list(images.shape[1:3]), dim=16, num_queries=4, layers=2, heads=2, ffn_dim=32,
            backbone={"fingerprint": tiny_clip.fingerprint, "source": "tiny", "name": "tiny"},
        )
        torch.manual_seed(0)
        paths.append(save_decoder(build_decoder(cfg).eval(), folder / task))
    return paths


@pytest.fixture(scope="module")
def single_process(tiny_clip_path, decoders, tmp_path_factory) -> Path:
    """The reference: the same run in this process (one torch thread, as each worker has)."""
    import _pytest.monkeypatch

    out = tmp_path_factory.mktemp("scaleout-single") / "run"
    with _pytest.monkeypatch.MonkeyPatch.context() as mp:
        from datasetdm.cli import main

        mp.setattr(sys, "argv", ["datasetdm", *map(str, generate_args(tiny_clip_path, decoders, out))])
        with pytest.raises(SystemExit) as done:
            main()
    assert (done.value.code or 0) == 0
    return out


# --------------------------------------------------------------------- without Ray


def test_workers_without_ray_is_a_one_line_error(tiny_clip_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, monkeypatch, "generate", "--labeler", "attention", "--classes", "dog",
                           "--backbone", tiny_clip_path, "--out", out, "--n", 1, "--workers", 2)
    assert_one_line_error(code, err, "--workers", "pip install 'datasetdm[ray]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gpus_per_worker_needs_workers(tiny_clip_path, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "generate", "--labeler", "attention", "--classes", "dog",
                           "--backbone", tiny_clip_path, "--out", tmp_path / "run", "--n", 1, "--gpus-per-worker", 1)
    assert_one_line_error(code, err, "--gpus-per-worker", "--workers")


def test_workers_in_any_order_write_the_single_process_bytes(single_process, tiny_clip_path, decoders, tmp_path,
                                                              capsys, monkeypatch):
    """Ray Data's part played in this process: two ``LabelWorker``s, each built from a pickled
    copy of the spec as Ray ships it, label the batches in reverse order; the results come back in
    batch order (``preserve_order``). The rest — CLI, driver, worker, encoding — is the real path."""
    import pickle

    import pyarrow as pa

    from datasetdm.generation import scaleout

    def in_process_executor(plan, spec):
        assert plan.workers == 2

        def run(batches, settings):
            workers = [scaleout.LabelWorker(**pickle.loads(pickle.dumps({"spec": spec, **settings}))) for _ in range(2)]
            blocks = {}
            for k in reversed(range(len(batches))):
                blocks[k] = workers[k % 2](pa.Table.from_pylist([scaleout.batch_item(*batches[k])]))
            for k in range(len(batches)):
                yield from scaleout.rows_from_block(blocks[k])

        return run

    monkeypatch.setattr(scaleout, "require_ray", lambda: None)
    monkeypatch.setattr(scaleout, "ray_executor", in_process_executor)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, monkeypatch, *generate_args(tiny_clip_path, decoders, out, "--workers", 2))
    assert code == 0, err
    assert dataset(out) == dataset(single_process)


def test_workers_claim_disjoint_cores(tmp_path):
    """Each CPU worker of a run takes the next free block of cores; once all are taken, none."""
    from datasetdm.generation.scaleout import claim_cores

    folder = tmp_path / "cores"
    assert [claim_cores(folder, 1, [0, 1, 5]) for _ in range(4)] == [{0}, {1}, {5}, None]
    pairs = tmp_path / "pairs"
    assert [claim_cores(pairs, 2, [0, 1, 2, 3, 4]) for _ in range(3)] == [{0, 1}, {2, 3}, None]


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pinned_worker_runs_every_thread_on_its_cores():
    """A worker pinned after its threads started (Ray's UDF thread is not the one that built it)
    keeps them all, and the threads it starts later, on its cores."""
    import json
    import subprocess

    code = """
import json, os, threading
from datasetdm.generation.scaleout import pin_process
core = max(os.sched_getaffinity(0))
stop, ids = threading.Event(), []
def wait():
    ids.append(threading.get_native_id())
    stop.wait()
early = threading.Thread(target=wait); early.start()
while not ids:
    pass
pin_process({core})
late = threading.Thread(target=wait); late.start()
while len(ids) < 2:
    pass
allowed = {int(t): open(f"/proc/self/task/{t}/status").read().split("Cpus_allowed_list:")[1].split()[0]
           for t in os.listdir("/proc/self/task")}
stop.set()
print(json.dumps({"core": core, "early": ids[0], "late": ids[1], "main": threading.get_native_id(), "allowed": allowed}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout)
    allowed = {int(t): cores for t, cores in seen["allowed"].items()}
    assert {seen["early"], seen["late"], seen["main"]} <= set(allowed)
    assert set(allowed.values()) == {str(seen["core"])}  # every thread, whenever it started


# --------------------------------------------------------------------- on Ray


def _descendants(pid: int) -> set[int]:
    """Processes below ``pid`` now (from /proc), so the test can see they end with it."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        children = [c for c, parent in parents.items() if parent == p]
        found.update(children)
        todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_two_workers_write_the_single_process_dataset(single_process, tiny_clip_path, decoders, tmp_path, capsys,
                                                      monkeypatch):
    pytest.importorskip("ray.data")
    import ray

    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, monkeypatch, *generate_args(tiny_clip_path, decoders, out, "--workers", 2))
    assert code == 0, err
    assert not ray.is_initialized()  # the local instance this run started is stopped
    assert f"{out}: " in stdout
    assert dataset(out) == dataset(single_process)


@pytest.mark.slow
def test_killed_driver_is_finished_by_one_worker(single_process, tiny_clip_path, decoders, tmp_path, capsys,
                                                 monkeypatch):
    pytest.importorskip("ray.data")
    out = tmp_path / "run"
    args = generate_args(tiny_clip_path, decoders, out, "--workers", 2)
    ray_processes: set[int] = set()
    # kill once a shard is complete and more are to come, noting the Ray processes it started
    kill_when([sys.executable, "-c", "from datasetdm.cli import main; main()", *args],
              lambda: (out / MANIFEST_FILE).exists(), watch=lambda pid: ray_processes.update(_descendants(pid)),
              timeout=600)
    done = read_manifest(out).num_rows
    assert 0 < done < N
    code, _, err = run_cli(capsys, monkeypatch, *generate_args(tiny_clip_path, decoders, out, "--resume", "--workers", 1))
    assert code == 0, err
    assert dataset(out) == dataset(single_process)
    # the killed driver's Ray instance (GCS, raylet, workers) does not outlive it
    deadline = time.monotonic() + 120
    while any(map(_alive, ray_processes)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes and not any(map(_alive, ray_processes)), sorted(p for p in ray_processes if _alive(p))


@pytest.mark.slow
def test_local_workers_run_at_the_drivers_priority():
    """Ray starts workers at nice 15; a local instance's workers are the run's compute and keep the
    driver's priority, or any other busy process on the machine starves them."""
    pytest.importorskip("ray.data")
    import os

    import ray

    from datasetdm.generation.scaleout import ScaleOut, _connect

    assert _connect(ray, ScaleOut(workers=1))
    try:
        worker_niceness = ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote())
    finally:
        ray.shutdown()
    assert worker_niceness == os.nice(0)
