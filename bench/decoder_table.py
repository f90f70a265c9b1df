"""The P-Decoder's figures against issue 5's targets, next to the paper's raw-pixel baseline.

For every task the same decoder is trained on the first 100 world train-split scenes (seed 0)
twice, once on hypercolumns and once on raw pixels (paper Table 6a's comparison), and scored on
500 held-out test-split scenes (seed 0) with `datasetdm evaluate`'s metrics. Then semantic mIoU
against the number of labelled images (20, 50, 100, 400; paper Table 6c). Open-vocabulary keeps
two categories out of training and reports them apart (``miou_unseen``) from the rest.

Every run writes its figures to OUT/results/{name}.json and is skipped when that file exists,
so an interrupted run continues; hypercolumns of the training images are cached once in
OUT/features and shared by every task.

    python bench/decoder_table.py --out runs/decoder-table           # ~50 min on 2 cores
    python bench/decoder_table.py --out /tmp/t --tiny                # plumbing, tiny random model
    python3 bench/decoder_table.py --out /tmp/t --device cuda        # on a lent GPU machine

The last printed line is JSON: every run's headline figures and whether each target holds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ("semantic", "instance", "depth", "pose", "open-vocab")
# issue 5's targets: (metric, bound, higher is better)
TARGETS = {
    "semantic": [("miou", 0.85, True)],
    "instance": [("mask_ap", 0.5, True), ("mask_ap50", 0.8, True)],
    "depth": [("abs_rel", 0.10, False)],
    "pose": [("keypoint_ap", 0.5, True)],
    "open-vocab": [("miou_unseen", 0.5, True), ("miou_seen", 0.8, True)],
}
SIZES = (20, 50, 100, 400)


def run_one(name: str, out: Path, train_dir: Path, test_dir: Path, task: str, features: str, n_images: int,
            backbone: str | None, iterations: int | None, held_out: list[str], device: str = "cpu") -> dict:
    from datasetdm.evaluation.evaluate import evaluate_decoder
    from datasetdm.io import write_json_atomic
    from datasetdm.training import TrainOptions, train_decoder

    result_path = out / "results" / f"{name}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    ckpt = out / "decoders" / name
    if not (ckpt / "config.json").exists():
        opts = TrainOptions(task=task, n_images=n_images, features=features, iterations=iterations,
                            held_out=held_out if task == "open-vocab" else [],
                            cache_dir=str(out / "features") if features == "hypercolumns" else None,
                            device=device)
        train_decoder(train_dir, ckpt, opts, backbone_source=backbone, show_progress=False)
    figures = evaluate_decoder(ckpt, test_dir, backbone_source=backbone, device=device)
    keep = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keep["n_test"] = keep.pop("n_images", None)
    result = {**keep, "task": task, "features": features, "n_images": n_images}
    write_json_atomic(result_path, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="Work folder (results, decoders, feature cache).")
    ap.add_argument("--backbone", default=None, help="Backbone folder (default: the embedded one).")
    ap.add_argument("--iterations", type=int, default=None,
                    help="Decoder iterations (default: datasetdm train's for each task).")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--held-out", default="ball,car", help="Open-vocab: two categories kept out of training.")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--features", default="hypercolumns,raw-pixels",
                    help="Which decoder inputs to run (the raw-pixel baseline can wait for a later run).")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="Semantic: labelled-image counts.")
    ap.add_argument("--tiny", action="store_true", help="Tiny random backbone, 8 test images, 20 iterations.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="Backbone and decoders there, e.g. cuda (minutes on a GPU).")
    args = ap.parse_args()

    import torch

    from datasetdm.world.folders import render_world_folder as render_world

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    backbone, iterations, n_test = args.backbone, args.iterations, args.n_test
    if args.tiny:
        from datasetdm.testing import make_tiny_backbone

        backbone = str(out / "tiny-backbone")
        if not (Path(backbone) / "model_index.json").exists():
            make_tiny_backbone(Path(backbone), text_encoder="minilm", sample_size=64)
        iterations, n_test, sizes = 20, 8, [s for s in sizes if s <= 20] or [8]
    held_out = [c for c in args.held_out.split(",") if c]
    n_train = max([100, *sizes]) if not args.tiny else max([20, *sizes])
    train_dir = render_world(out / "world" / "train", "train", 0, n_train)
    test_dir = render_world(out / "world" / "test", "test", 0, n_test)
    n_main = 100 if not args.tiny else 20

    results = {}
    for task in tasks:
        for features in [f for f in args.features.split(",") if f]:
            name = f"{task}-{features}-{n_main}"
            print(f"{name} ...", flush=True)
            results[name] = run_one(name, out, train_dir, test_dir, task, features, n_main, backbone, iterations, held_out,
                                    args.device)
    if "semantic" in tasks:
        for n in sizes:
            name = f"semantic-hypercolumns-{n}"
            print(f"{name} ...", flush=True)
            results[name] = run_one(name, out, train_dir, test_dir, "semantic", "hypercolumns", n, backbone,
                                    iterations, held_out, args.device)

    shown = {m for t in TARGETS.values() for m, _, _ in t} | {"rmse", "delta1", "keypoint_ap50"}
    print(f"\n{'run':<32}{'figures'}")
    for name, r in results.items():
        print(f"{name:<32}" + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k in shown))
    targets = {}
    for task in tasks:
        r = results[f"{task}-hypercolumns-{n_main}"]
        for metric, bound, higher in TARGETS[task]:
            if metric in r:
                targets[f"{task}_{metric}"] = {"value": round(r[metric], 4), "target": bound,
                                               "met": r[metric] >= bound if higher else r[metric] <= bound}
    print(json.dumps({"runs": {k: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in r.items()}
                               for k, r in results.items()},
                      "targets": targets, "iterations": iterations, "n_test": n_test, "held_out": held_out}))


if __name__ == "__main__":
    main()
