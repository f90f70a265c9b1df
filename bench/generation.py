"""Generation throughput, and what labelling costs on top of plain text-to-image.

Three modes on the same backbone, prompts (world-style captions), seeds, steps and guidance:

- ``plain``: ``generate(..., capture=False)`` (a ``Predictor`` without decoders), images only;
- ``decoder``: ``generate`` with capture, then a semantic P-Decoder labels each image from the
  captured hypercolumns (DatasetDM);
- ``attention``: class-prompt appending + side-branch class attention + 16x16 self-attention,
  labelled by the training-free ``AttentionLabeler`` (Dataset Diffusion).

Both labelers come from ``labelers.registry.create_labeler``, as ``datasetdm generate`` makes them.

Time: modes alternate (A B C C B A …) in one process after a warm-up; each mode's minimum over
repeats is used (the machine is shared; the minimum is the least disturbed run). Memory: each
mode runs once in a fresh subprocess and reports its peak RSS above the RSS before generation
(weights excluded), sampled every millisecond.

    python bench/generation.py [--backbone DIR] [--decoder CKPT] [--batch 16] [--steps 25]

Without ``--backbone``: the embedded backbone (a tiny random model if it is not in the checkout).
Without ``--decoder``: a semantic decoder is trained briefly on 16 world images (its quality does
not change its cost). The last line is JSON with ``samples_per_second`` (decoder-annotated) and
``time_ratio`` (annotated over plain; target ≤ 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors leave the RSS


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    def __enter__(self):
        self.base = self.peak = _rss_mib()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss_mib())


def setup(args):
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.decoder.predictor import Predictor
    from datasetdm.demo import resolve_backbone
    from datasetdm.labelers.registry import create_labeler
    from datasetdm.world.folders import render_world_folder as render_world
    from datasetdm.world.render import CATEGORIES, render_scene

    work = Path(args.work)
    source = resolve_backbone(args.backbone)
    bb = load_backbone(source)
    decoder_path = args.decoder
    if decoder_path is None:
        decoder_path = work / "semantic-decoder"
        if not (decoder_path / "config.json").exists():
            from datasetdm.training import TrainOptions, train_decoder

            data = render_world(work / "world", "train", 0, 16)
            train_decoder(data, decoder_path, TrainOptions(task="semantic", n_images=16, views=1, iterations=20),
                          backbone_source=source, show_progress=False)
    # the labelers as `datasetdm generate` builds them (one factory)
    decoder = create_labeler("decoder", bb, steps=args.steps, guidance=args.guidance, decoders=[decoder_path])
    attention = create_labeler("attention", bb, steps=args.steps, guidance=args.guidance, categories=CATEGORIES)
    images_only = Predictor(bb)  # no decoders: text to images
    prompts = [render_scene("val", 0, i).caption for i in range(args.batch)]
    seeds = list(range(args.batch))

    def plain():
        images_only.generate(prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                             capture=False)

    def labelled(labeling):
        def run():
            images, hc = labeling.generate_fn(prompts, seeds)
            for annotate in labeling.annotators.values():
                annotate(images, hc, prompts)
            labeling.release()  # nothing of this batch is held into the next one (or the memory base)

        return run

    info = {"backbone": str(source), "batch": args.batch,
            "steps": args.steps, "guidance": args.guidance}
    return {"plain": plain, "decoder": labelled(decoder), "attention": labelled(attention)}, info


def memory_worker(args, mode: str) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fns, _ = setup(args)
    fns[mode]()  # warm-up (allocator, lazy imports)
    with PeakRSS() as rss:
        fns[mode]()
    print(json.dumps({"mode": mode, "peak_above_base_mib": round(rss.peak - rss.base, 1), "peak_mib": round(rss.peak, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone")
    p.add_argument("--decoder")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "datasetdm-bench-generation"))
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        memory_worker(args, args.worker)
        return

    import torch

    torch.set_num_threads(args.threads)
    fns, info = setup(args)
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(args.repeats):
        for mode in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[mode]()
            times[mode].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    best = {k: min(v) for k, v in times.items()}
    memory = {}
    for mode in fns:
        cmd = [sys.executable, __file__, "--worker", mode, "--batch", str(args.batch), "--steps", str(args.steps),
               "--guidance", str(args.guidance), "--threads", str(args.threads), "--work", args.work]
        cmd += ["--backbone", args.backbone] if args.backbone else []
        cmd += ["--decoder", args.decoder] if args.decoder else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        memory[mode] = json.loads(out)
    n = args.batch
    result = {
        "bench": "generation",
        **info,
        "samples_per_second": round(n / best["decoder"], 3),
        "samples_per_second_plain": round(n / best["plain"], 3),
        "samples_per_second_attention": round(n / best["attention"], 3),
        "time_ratio": round(best["decoder"] / best["plain"], 4),
        "attention_time_ratio": round(best["attention"] / best["plain"], 4),
        "seconds_per_sample": {k: round(v / n, 4) for k, v in best.items()},
        "peak_memory_above_base_mib": {k: v["peak_above_base_mib"] for k, v in memory.items()},
        "peak_memory_mib": {k: v["peak_mib"] for k, v in memory.items()},
        "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
