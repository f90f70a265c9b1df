"""Does the gates' reference segmenter reach its 0.95 bar with more capacity or training?

Trains ``UNetSegmenter`` variants (base width x depth x steps x batch) on the reference's data
(first N train-split scenes of seed ``SEGMENTER_TRAIN_SEED``, both heads: semantic and colour)
and scores semantic mIoU and per-class IoU on the gates' 500 held-out test scenes. The shipped
reference is ``32x5x16000x64`` (0.955; the one before it, ``16x5x6000x32``, plateaued at 0.902). On a GPU (``--device cuda``) a variant takes
minutes; ``--budget-s`` skips the rest when the time is spent. ``--save`` keeps the best model's
weights (fp16 safetensors, config in the metadata) to package it if it passes.

    python bench/reference_capacity.py --device cuda --variants 32x5x16000x64,16x5x6000x32

The last printed line is JSON: every variant's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _render_chunk(seed: int, start: int, stop: int):
    from datasetdm.embedded.gates import colour_target
    from datasetdm.world.render import render_scene

    scenes = [render_scene("train", seed, i) for i in range(start, stop)]
    return (np.stack([s.image for s in scenes]), np.stack([s.semantic for s in scenes]),
            np.stack([colour_target(s) for s in scenes]))


def render_train(seed: int, n: int, workers: int):
    from functools import partial

    from datasetdm.world.render import map_scene_chunks

    parts = [part for _, _, part in map_scene_chunks(partial(_render_chunk, seed), n, workers)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="32x5x16000x64,16x5x6000x32")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip variants once this much time is spent")
    ap.add_argument("--save", default=None, help="folder for the best variant's weights")
    args = ap.parse_args()

    import torch

    from datasetdm.embedded import gates
    from datasetdm.evaluation.metrics import SemanticIoU
    from datasetdm.evaluation.segmenter import SegmenterTrainConfig, train_segmenter
    from datasetdm.world.render import CATEGORIES

    t0 = time.time()
    images, semantic, colour = render_train(gates.SEGMENTER_TRAIN_SEED, args.n_train, args.workers)
    test = gates.render_set("test", gates.TEST_SEED, 500)
    print(f"rendered {len(images)} train + 500 test scenes in {time.time() - t0:.0f} s", flush=True)
    names = {0: "background", **{c.id: c.name for c in CATEGORIES}}
    results, best = [], None
    for spec in args.variants.split(","):
        base, depth, steps, batch = (int(v) for v in spec.split("x"))
        if time.time() - t0 > args.budget_s:
            results.append({"variant": spec, "skipped": "budget spent"})
            continue
        config = gates.ReferenceConfig(n_train=args.n_train, base=base, depth=depth, steps=steps, batch_size=batch)
        t1 = time.time()
        model = train_segmenter(images, {"semantic": semantic, "colour": colour}, gates.NUM_CLASSES,
                                SegmenterTrainConfig(steps=steps, batch_size=batch, lr=config.lr, seed=config.seed),
                                base=base, depth=depth, device=args.device)
        train_s = time.time() - t1
        model.to(args.device)
        pred = gates.predict(model, test.images)
        model.cpu()
        per_class = SemanticIoU([c.id for c in CATEGORIES])
        for p, t in zip(pred["semantic"], test.semantic):
            per_class.update(p, t)
        row = {"variant": spec, "params": sum(p.numel() for p in model.parameters()),
               "miou_semantic": round(gates.miou(pred["semantic"], test.semantic, gates.NUM_CLASSES["semantic"]), 4),
               "miou_colour": round(gates.miou(pred["colour"], test.colour, gates.NUM_CLASSES["colour"]), 4),
               "per_class": {names[c]: round(v, 3) for c, v in per_class.compute()["iou"].items()},
               "train_s": round(train_s, 1),
               "reference_key": config.key()}
        print(json.dumps(row), flush=True)
        results.append(row)
        if best is None or row["miou_semantic"] > best["miou_semantic"]:
            best = row
            if args.save:  # now, not at the end: a run cut short keeps its best so far
                print("saved", gates.package_reference(model, config, folder=args.save,
                                                       scores={"reference_miou_semantic": row["miou_semantic"],
                                                               "reference_miou_colour": row["miou_colour"]}))
    print(json.dumps({"device": args.device, "n_train": args.n_train, "variants": results,
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
