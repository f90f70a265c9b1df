"""The downstream segmenter trained in fp32 and with bf16 autocast: time per step and test mIoU.

Both runs use the downstream recipe (``DownstreamConfig``: U-Net base 24, depth 4, batch 32, same
seed and batches) on the first 100 world train-split scenes (seed 0) and are scored on held-out
test-split scenes (seed 0). bf16 autocast only changes the forward's matmul/conv precision;
weights, optimizer and loss stay fp32. It pays on CPUs with native bf16 (AVX512-BF16, AMX).

    python bench/segmenter_bf16.py --steps 2000      # the downstream recipe, ~30 min on 2 cores
    python bench/segmenter_bf16.py --steps 300       # quicker look

The last printed line is JSON with ``speedup`` (fp32 s/step over bf16 s/step) and both mIoUs.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from datasetdm.evaluation.downstream import DownstreamConfig, evaluate_segmenter
    from datasetdm.evaluation.segmenter import SegmenterTrainConfig, train_segmenter
    from datasetdm.world.render import CATEGORIES, render_scene

    torch.set_num_threads(args.threads)

    def world(split: str, n: int):
        scenes = [render_scene(split, 0, i) for i in range(n)]
        return np.stack([np.asarray(s.image) for s in scenes]), np.stack([np.asarray(s.semantic) for s in scenes])

    train_x, train_y = world("train", args.n_train)
    test_x, test_y = world("test", args.n_test)
    ids = [c.id for c in CATEGORIES]
    num_classes = max(ids) + 1
    figures = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        recipe = DownstreamConfig(steps=args.steps)
        config = SegmenterTrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                                      seed=recipe.seed, bf16=bf16)
        times: list[float] = []
        last = [time.perf_counter()]

        def progress(step: int, loss: float) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        model = train_segmenter(train_x, {"semantic": train_y}, {"semantic": num_classes}, config, progress=progress)
        miou = evaluate_segmenter(model, test_x, test_y, ids)["miou"]
        per_step = float(np.median(times[5:] or times))
        figures[name] = {"s_per_step": round(per_step, 4), "miou": round(float(miou), 4)}
        print(f"{name}: {per_step:.3f} s/step, test mIoU {miou:.4f}", flush=True)
    print(json.dumps({
        "speedup": round(figures["fp32"]["s_per_step"] / figures["bf16"]["s_per_step"], 3),
        "miou_fp32": figures["fp32"]["miou"], "miou_bf16": figures["bf16"]["miou"],
        "s_per_step_fp32": figures["fp32"]["s_per_step"], "s_per_step_bf16": figures["bf16"]["s_per_step"],
        "steps": args.steps, "n_train": args.n_train, "n_test": args.n_test, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
