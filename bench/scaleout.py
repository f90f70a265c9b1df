"""Scale-out throughput: `generate` on 1 and 2 Ray workers against the plain single process.

Three runs of the `generate` command on the same backbone (the embedded one by default), prompts
(world val captions), seeds, steps and guidance, each in a fresh process and output folder, every
process and worker with one torch thread:

- ``single``: the plain single process;
- ``ray1``: ``--workers 1`` (a local Ray instance, one worker);
- ``ray2``: ``--workers 2``.

Samples/s are the command's own figure (its summary line: from the first batch planned to the
last sample written, so Ray's start and the workers' model loading count, the driver's model load
does not); the wall time of the whole command is reported beside it. With ``--repeats`` the modes
alternate (A B C C B A …) and each mode's best run is used (the machine is shared). The three
datasets must be byte-identical (checked, ``identical`` in the JSON).

    python bench/scaleout.py [--backbone DIR] [--decoder CKPT ...] [--n 512] [--batch 16] [--steps 25]

Without ``--decoder`` the training-free attention labeler labels the world's classes. The last
line is JSON with ``speedup_2_workers`` (ray2 over ray1; goal ≥ 1.8) and ``ray_overhead``
(1 − ray1 / single; goal ≤ 0.10).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUMMARY = re.compile(r"(\d+) generated now at ([0-9.]+) samples/s")
MODES = {"single": [], "ray1": ["--workers", "1"], "ray2": ["--workers", "2"]}


def command(args, out: Path, prompts: Path, mode: str) -> list[str]:
    cmd = [sys.executable, "-c", "from datasetdm.cli import main; main()", "generate", "--out", str(out),
           "--n", str(args.n), "--batch-size", str(args.batch), "--steps", str(args.steps),
           "--guidance", str(args.guidance), "--prompts", str(prompts), "--device", "cpu", *MODES[mode]]
    cmd += ["--backbone", args.backbone] if args.backbone else []
    if args.decoder:
        for d in args.decoder:
            cmd += ["--decoder", d]
    else:
        from datasetdm.world.render import CATEGORIES

        cmd += ["--labeler", "attention", "--classes", ",".join(c.name for c in CATEGORIES)]
    return cmd


def run_mode(args, work: Path, prompts: Path, mode: str, repeat: int) -> dict:
    out = work / f"{mode}-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread per process and worker
    t0 = time.perf_counter()
    done = subprocess.run(command(args, out, prompts, mode), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{mode}: generate failed:\n{done.stderr[-3000:]}")
    match = SUMMARY.search(done.stdout)
    if match is None or int(match.group(1)) != args.n:
        sys.exit(f"{mode}: unexpected summary {done.stdout!r}")
    return {"out": out, "samples_per_second": float(match.group(2)), "wall_seconds": wall}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone")
    p.add_argument("--decoder", action="append", help="decoder checkpoint (repeatable); default: attention labeler")
    p.add_argument("--n", type=int, default=512, help="samples per run (Ray's start, ~15 s here, is amortised over them)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "datasetdm-bench-scaleout"))
    args = p.parse_args()

    from datasetdm.demo import resolve_backbone
    from datasetdm.world.folders import world_prompt_file

    args.backbone = resolve_backbone(args.backbone)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = world_prompt_file(work / f"prompts-{args.n}.txt", args.n)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    order = list(MODES)
    for r in range(args.repeats):
        for mode in order if r % 2 == 0 else order[::-1]:
            results[mode].append(run_mode(args, work, prompts, mode, r))
            last = results[mode][-1]
            print(f"repeat {r + 1}/{args.repeats} {mode}: {last['samples_per_second']:.3f} samples/s, "
                  f"{last['wall_seconds']:.1f} s wall", flush=True)
    best = {m: max(v, key=lambda x: x["samples_per_second"]) for m, v in results.items()}
    reference = shard_bytes(best["single"]["out"])
    identical = all(shard_bytes(best[m]["out"]) == reference for m in ("ray1", "ray2"))
    rate = {m: best[m]["samples_per_second"] for m in MODES}
    result = {
        "bench": "scaleout",
        "backbone": args.backbone,
        "labeler": "decoder" if args.decoder else "attention",
        "n": args.n, "batch": args.batch, "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
        "samples_per_second": {m: round(v, 3) for m, v in rate.items()},
        "wall_seconds": {m: round(best[m]["wall_seconds"], 1) for m in MODES},
        "speedup_2_workers": round(rate["ray2"] / rate["ray1"], 3),
        "ray_overhead": round(1 - rate["ray1"] / rate["single"], 3),
        "identical": identical,
        "threads_per_process": 1,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
