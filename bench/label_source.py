"""Where the synthetic data's loss lies: the decoder's labels, or the generated images?

`datasetdm downstream --task T --out OUT` trains its ordinary model on the T decoder's labels of
generated images. This bench trains the same model on the same decoder's labels of *real* world
scenes (N train-split scenes of another seed than the real few-shot set; the decoder reads them as
`evaluate` does, and keeps what the labeler keeps), against the same real-only model (OUT/cache)
and test scenes. If these labels teach about as well as the real set's own, the decoder labels
well and the generated images are what costs; if they teach as little as the generated data, the
labels are.

    python bench/label_source.py --out runs/ds-pose --task pose --test-seed 1   # after that downstream run
    python bench/label_source.py --out /tmp/ds --task pose --n 8 --n-test 4 --steps 3   # plumbing

The last printed line is JSON: the real-only, generated-image and real-image-label figures of the
task's metrics, for the synthetic-only and the joint models.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def label_real_scenes(decoder: Path, scenes: Path, out: Path, min_instance_score: float | None = None) -> Path:
    """``scenes``' images labelled by ``decoder`` as a labelled folder at ``out`` (kept: a rerun reuses
    it); instances kept as the labeler keeps them (``min_instance_score``, default the labeler's)."""
    from datasetdm.evaluation.evaluate import decoder_predictions
    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.labelers.decoder import DEFAULT_MIN_INSTANCE_SCORE, labels_from_predictions
    from datasetdm.world.render import CATEGORIES

    keep = DEFAULT_MIN_INSTANCE_SCORE if min_instance_score is None else min_instance_score
    if (out / "annotations.json").exists():
        return out
    _, batches = decoder_predictions(decoder, scenes, show_progress=True)
    with LabelledFolderWriter(out, list(CATEGORIES), overwrite=True) as writer:
        for samples, preds in batches:
            images = [s.image for s in samples]
            for sample, label in zip(samples, labels_from_predictions(preds, images, keep)):
                label.id, label.caption = sample.id, sample.caption
                writer.add(label)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="The `downstream --task T` run's folder.")
    ap.add_argument("--task", required=True, choices=["instance", "depth", "pose"])
    ap.add_argument("--n", type=int, default=1000, help="Real scenes the decoder labels (as many as generated).")
    ap.add_argument("--scene-seed", type=int, default=1, help="Their world seed (the real few-shot set is seed 0).")
    ap.add_argument("--test-seed", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=2000, help="The ordinary model's training steps.")
    ap.add_argument("--joint", default="finetune", help="The joint model's recipe (downstream --joint).")
    args = ap.parse_args()

    from datasetdm.evaluation.downstream import TASK_METRICS, run_task_downstream, world_test_samples
    from datasetdm.evaluation.task_models import TaskModelConfig
    from datasetdm.world.folders import render_world_folder
    from datasetdm.world.render import CATEGORIES

    decoder = args.out / "decoders" / args.task
    if not (decoder / "config.json").exists():
        raise SystemExit(f"{decoder}: no decoder; run `datasetdm downstream --task {args.task} --out {args.out}` first")
    scenes = render_world_folder(args.out / f"scenes-train-seed{args.scene_seed}-n{args.n}", "train",
                                 args.scene_seed, args.n)
    labels = label_real_scenes(decoder, scenes, args.out / f"labels-{args.task}-train-seed{args.scene_seed}-n{args.n}")
    result = run_task_downstream(args.task, args.out / "real", labels, world_test_samples(args.test_seed, args.n_test),
                                 list(CATEGORIES), TaskModelConfig(steps=args.steps), cache_dir=args.out / "cache",
                                 joint=args.joint)
    recipe_tag = "" if args.joint == "finetune" else f"-joint-{args.joint}"
    generated_file = args.out / f"downstream-{args.task}{recipe_tag}.json"
    generated = json.loads(generated_file.read_text()) if generated_file.exists() else {}
    metrics = TASK_METRICS[args.task]
    rows = {"real only": {m: result[f"real_{m}"] for m in metrics}}
    for name, source in (("decoder labels of generated images", generated), ("decoder labels of real scenes", result)):
        for model in ("synthetic", "joint"):
            rows[f"{name}: {'alone' if model == 'synthetic' else 'joint'}"] = {m: source.get(f"{model}_{m}")
                                                                               for m in metrics}
    print(f"{'training data':<48}" + "".join(f"{m:>14}" for m in metrics))
    for name, values in rows.items():
        print(f"{name:<48}" + "".join(f"{'-':>14}" if v is None else f"{v:>14.4f}" for v in values.values()))
    print(json.dumps({"task": args.task, "joint": args.joint, "n": args.n, "scene_seed": args.scene_seed,
                      "test_seed": args.test_seed,
                      "rows": rows, "labels": str(labels), "generated_result": str(generated_file)}))


if __name__ == "__main__":
    from datasetdm.errors import run_script

    run_script(main)
