"""Generation across workers and GPUs on Ray Data (issue 19): ``generate --workers N``,
``--ray-address ADDR``, ``--gpus-per-worker G``.

This process (the driver) plans the batches exactly as a single-process run does
(``loop.batch_plan``: sample ids, their prompts), and Ray Data's actor pool labels them: each worker
is an actor that builds the backbone and labeler once from the run's ``LabelerSpec`` and runs
``loop.BatchLabeler`` on one batch at a time, so a worker returns the very bytes the single
process would have written (images and labels encoded as shard files, manifest row as JSON).
Ray Data hands the results back in batch order (``preserve_order``), and the driver alone writes
shards and manifest through ``ShardWriter`` in sample-id order. Hence:

* the dataset depends on the sample ids only, not on N, on which worker ran a batch or on the
  order they finish (workers on the CPU give the single-process bytes, one thread each in both);
* a driver killed with -9 leaves what a killed single-process run leaves (workers never touch the
  output folder), and ``--resume`` with the same or another N — or none — finishes the same dataset.

Ray is optional (``pip install 'datasetdm[ray]'``). Without ``--ray-address`` the driver starts a
local Ray instance sized for the workers and stops it at the end, its CPU workers each pinned to
cores of their own; with it, every node must see
the backbone, decoder and prompt paths at the same place (a shared file system).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from datasetdm.errors import DatasetdmError
from datasetdm.generation.loop import BatchLabeler, Executor, LabelledRow
from datasetdm.prompts.base import Prompt

INSTALL = "pip install 'datasetdm[ray]'"


@dataclass(frozen=True)
class ScaleOut:
    """How to spread a run: ``workers`` actors (None with an address: as many as the cluster's
    GPUs or CPUs hold), on a local Ray instance or the cluster at ``address``; each worker takes
    ``gpus_per_worker`` GPUs (a fraction shares one) and ``cpus_per_worker`` CPUs (its torch
    threads on the CPU)."""

    workers: int | None = None
    address: str | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise DatasetdmError(f"--workers must be >= 1, got {self.workers}")
        if self.workers is None and self.address is None:
            raise DatasetdmError("scale-out needs --workers N (a local Ray instance) or --ray-address ADDR")
        if not 0 <= self.gpus_per_worker or not math.isfinite(self.gpus_per_worker):
            raise DatasetdmError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if not 0 < self.cpus_per_worker or not math.isfinite(self.cpus_per_worker):
            raise DatasetdmError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")

    def worker_dtype(self, dtype: str | None) -> str | None:
        """The precision the workers run in, as ``--dtype`` (None: the default, fp32 on the CPU)
        — fp16 by default on GPU workers, as ``backbone.device`` chooses for CUDA."""
        if dtype is not None:
            return dtype
        return "fp16" if self.gpus_per_worker > 0 else None


def require_ray():
    """The ``ray`` module, or a one-line DatasetdmError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra has no Ray Data)
    except ImportError:
        raise DatasetdmError(f"--workers/--ray-address: Ray Data is not installed; {INSTALL}") from None
    return ray


def ray_executor(scaleout: ScaleOut, spec) -> Executor:
    """The ``executor`` of ``loop.generate_dataset`` that labels on Ray workers built from
    ``spec`` (a ``setup.LabelerSpec``). Checks Ray and the device options at once; Ray starts
    only when there are batches to label."""
    ray = require_ray()
    device = str(spec.device).lower()
    if scaleout.gpus_per_worker > 0 and device == "cpu":
        raise DatasetdmError("--gpus-per-worker: the workers would run on the CPU (--device cpu); "
                             "use --device auto or cuda")
    if scaleout.gpus_per_worker == 0 and device.startswith("cuda"):
        raise DatasetdmError(f"--device {spec.device}: Ray workers see a GPU only with --gpus-per-worker")
    if scaleout.gpus_per_worker == 0 and device == "auto":
        spec = replace(spec, device="cpu")  # a worker without GPUs runs on the CPU even where a node has one

    def run(batches: list[tuple[list[int], list[Prompt]]], settings: dict) -> Iterator[LabelledRow]:
        if not batches:
            return
        started = _connect(ray, scaleout)
        try:
            yield from _label_on_ray(ray, scaleout, spec, batches, settings)
        except DatasetdmError:
            raise
        except Exception as e:  # a worker's DatasetdmError arrives wrapped in Ray's errors
            user = _user_error(e)
            if user is None:
                raise
            raise user from None
        finally:
            if started:
                ray.shutdown()

    return run


def _connect(ray, scaleout: ScaleOut) -> bool:
    """Connect to Ray; True when this call started the instance (and must stop it)."""
    if ray.is_initialized():  # a library user's own ray.init: use it, leave it running
        return False
    # workers' own output (model-loading bars) stays in Ray's logs; their errors still reach the driver
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if scaleout.address is not None:
        try:
            ray.init(address=scaleout.address, **quiet)
        except Exception as e:
            raise DatasetdmError(f"--ray-address {scaleout.address}: cannot connect ({str(e).splitlines()[0]})") from None
        return True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline by design: no usage report
    cpus = max(1, math.ceil(scaleout.workers * scaleout.cpus_per_worker))
    try:
        # address="local": a fresh instance even if RAY_ADDRESS points elsewhere; no GPUs unless asked
        # Ray runs its workers at nice 15 so that its own processes stay responsive; here they are the
        # run's compute, and at that priority any other busy process starves them (two workers beside
        # two busy jobs on 2 cores labelled no batch in 10 minutes): they keep the driver's priority.
        ray.init(address="local", num_cpus=cpus, num_gpus=None if scaleout.gpus_per_worker > 0 else 0,
                 _system_config={"worker_niceness": 0}, **quiet)
    except Exception as e:  # e.g. its raylet gives up when its helpers take over 15 s to start
        raise DatasetdmError(f"--workers: could not start a local Ray instance ({str(e).splitlines()[0]}); "
                             "Ray's logs are under /tmp/ray/session_latest/logs") from None
    return True


def _worker_count(ray, scaleout: ScaleOut) -> int:
    if scaleout.workers is not None:
        return scaleout.workers
    resources = ray.cluster_resources()
    if scaleout.gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // scaleout.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // scaleout.cpus_per_worker))


def _label_on_ray(ray, scaleout: ScaleOut, spec, batches, settings) -> Iterator[LabelledRow]:
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True  # results in batch order: the driver writes as they come
    context.enable_progress_bars = False  # the run's own bar shows samples/s across workers
    cores = _core_claims(scaleout)
    try:
        items = [batch_item(ids, prompts) for ids, prompts in batches]
        data = ray.data.from_items(items, override_num_blocks=len(items))  # one block per batch
        workers = _worker_count(ray, scaleout)
        labelled = data.map_batches(
            LabelWorker, batch_size=1, batch_format="pyarrow",
            fn_constructor_kwargs={"spec": spec, "seed": settings["seed"], "filters": settings["filters"],
                                   "threads": max(1, int(scaleout.cpus_per_worker)),
                                   "cores": str(cores) if cores else None},
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=scaleout.cpus_per_worker, num_gpus=scaleout.gpus_per_worker or None,
        )
        for block in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from rows_from_block(block)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if cores:
            shutil.rmtree(cores, ignore_errors=True)


def _core_claims(scaleout: ScaleOut) -> Path | None:
    """A fresh folder in which CPU workers of a local instance claim their cores
    (``claim_cores``), or None where they are not pinned: GPU workers, fractional CPUs, and a
    cluster (``--ray-address``), whose nodes other jobs may share."""
    if (scaleout.address is not None or scaleout.gpus_per_worker > 0 or scaleout.cpus_per_worker % 1
            or not hasattr(os, "sched_setaffinity")):
        return None
    return Path(tempfile.mkdtemp(prefix="datasetdm-cores-"))


def claim_cores(folder: Path, count: int, allowed: list[int] | None = None) -> set[int] | None:
    """The next unclaimed block of ``count`` cores among ``allowed`` (default: the cores this
    process may run on), claimed for good by creating its file in ``folder`` (atomic across the
    workers of a node); None when every block is taken."""
    allowed = sorted(os.sched_getaffinity(0)) if allowed is None else allowed
    folder.mkdir(parents=True, exist_ok=True)
    for block in range(len(allowed) // count):
        try:
            os.close(os.open(folder / f"block-{block}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        return set(allowed[block * count:(block + 1) * count])
    return None


def pin_process(cores: set[int]) -> None:
    """Run every thread of this process, and those it starts later, on ``cores`` only."""
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except ProcessLookupError:  # a thread that has just ended
            pass


def batch_item(ids: list[int], prompts: list[Prompt]) -> dict:
    """One batch as a row of the input dataset: its sample ids and (JSON) prompts."""
    return {"ids": list(ids), "prompts": json.dumps([[p.text, list(p.classes)] for p in prompts])}


def rows_from_block(block) -> Iterator[LabelledRow]:
    """The ``LabelledRow``s of a block of ``LabelWorker`` output (a pyarrow table)."""
    for r in block.to_pylist():
        files = dict(zip(r["names"], r["blobs"])) if r["kept"] else None
        yield LabelledRow(r["id"], json.loads(r["row"]), files, r["warning"])


class LabelWorker:
    """A Ray Data actor: builds the backbone and labeler once, then labels one batch of sample
    ids per call (a pyarrow table of ``ids`` and JSON ``prompts``) into one row per sample.
    ``cores``: a folder where the run's CPU workers claim cores to be pinned to (``claim_cores``)."""

    def __init__(self, spec, seed: int, filters, threads: int = 1, cores: str | None = None):
        import torch

        from datasetdm.generation.setup import build_labeling

        torch.set_num_threads(threads)  # one thread per CPU the worker holds: workers do not compete
        claimed = claim_cores(Path(cores), threads) if cores else None
        if claimed:
            # Left to the OS, the workers wander between cores and each move refills a cache: pinned,
            # two workers on this 2-core machine spent ~7% less CPU per batch (NOTES, session 23).
            pin_process(claimed)
        _, labeling = build_labeling(spec)
        self.label = BatchLabeler(labeling.generate_fn, labeling.annotators, labeling.categories, seed, filters,
                                  labeling.read_prompt)

    def __call__(self, batch):
        import pyarrow as pa

        columns = {"id": [], "row": [], "kept": [], "names": [], "blobs": [], "warning": []}
        for ids, prompts in zip(batch.column("ids").to_pylist(), batch.column("prompts").to_pylist()):
            for item in self.label(ids, [Prompt(text, tuple(classes)) for text, classes in json.loads(prompts)]):
                files = item.files or {}
                columns["id"].append(item.id)
                columns["row"].append(json.dumps(item.row))
                columns["kept"].append(item.files is not None)
                columns["names"].append(list(files))
                columns["blobs"].append(list(files.values()))
                columns["warning"].append(item.warning)
        return pa.table({
            "id": pa.array(columns["id"], pa.int64()),
            "row": pa.array(columns["row"], pa.string()),
            "kept": pa.array(columns["kept"], pa.bool_()),
            "names": pa.array(columns["names"], pa.list_(pa.string())),
            "blobs": pa.array(columns["blobs"], pa.list_(pa.large_binary())),
            "warning": pa.array(columns["warning"], pa.string()),
        })


def _user_error(error: BaseException) -> DatasetdmError | None:
    """The DatasetdmError a worker raised, found in the chain of Ray's wrappers (its message as
    the worker wrote it), or None."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DatasetdmError) and type(e) is DatasetdmError:
            return DatasetdmError(*e.args)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
