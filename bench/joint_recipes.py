"""Which joint recipe? After `datasetdm downstream --task T --out OUT`, train T's ordinary model on
the run's real set alone and jointly with its synthetic set by each recipe (`downstream --joint`),
and score every model on the test scenes of several seeds: a recipe is chosen on one seed and
reported on another (`downstream --test-seed`), so the reported figure is not the one tuned on.

    python bench/joint_recipes.py --out runs/ds-inst --task instance --test-seeds 2,1
    python bench/joint_recipes.py --out /tmp/ds --task instance --steps 4 --n-test 2   # plumbing
    python bench/joint_recipes.py --out runs/ds-pose --task pose --recipes finetune --synthetic OTHER  # another set

Each finished model's figures are kept in OUT/joint-recipes/ (a rerun resumes). The last printed
line is JSON: per model ("real", "joint-finetune", "joint-mixed") and test seed, the task's metrics.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compare(real: Path, synthetic: Path, task: str, seeds: list[int], n_test: int, steps: int,
            recipes: list[str], keep: Path, min_joint_score: float | None = None, synthetic_tag: str = "") -> dict:
    """{model: {"seed S": metrics}} for the real-only model and one joint model per recipe; each
    model's figures are written to ``keep`` when it is scored and read from there on a rerun
    (``synthetic_tag`` names a synthetic set other than the run's own in the joint models' files)."""
    import numpy as np

    from datasetdm.evaluation.downstream import folder_task_data, train_joint_task_model, world_test_samples
    from datasetdm.evaluation.task_models import TaskModelConfig, predict_task, score_task, train_task_model
    from datasetdm.io import write_json_atomic
    from datasetdm.world.render import CATEGORIES

    categories = list(CATEGORIES)
    real_d = folder_task_data(real, task, categories, "real")
    syn_d = folder_task_data(synthetic, task, categories, "synthetic", min_joint_score=min_joint_score)
    config = TaskModelConfig(steps=steps)
    num_classes = max(c.id for c in categories) + 1
    class_ids = [c.id for c in categories] if task == "instance" else [c.id for c in categories if c.keypoints][:1]
    tests = {seed: world_test_samples(seed, n_test) for seed in seeds}
    results = {}
    for name in ["real"] + [f"joint-{r}" for r in recipes]:
        sure = f"-joints{min_joint_score:g}" if min_joint_score is not None and name != "real" else ""
        sure += synthetic_tag if name != "real" else ""
        stored = keep / f"{task}-{name.replace(':', '-')}{sure}-steps{steps}-test{n_test}.json"
        figures = json.loads(stored.read_text()) if stored.exists() else {}
        if any(f"seed {s}" not in figures for s in seeds):
            if name == "real":
                model = train_task_model(real_d, num_classes, config)
            else:
                model = train_joint_task_model(real_d, syn_d, num_classes, config, name.removeprefix("joint-"))
            for seed, samples in tests.items():
                images = np.stack([s.image for s in samples])
                preds = predict_task(model, task, images, class_ids, config)
                metrics = score_task(task, preds, samples, categories)
                figures[f"seed {seed}"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
            keep.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stored, figures)
        results[name] = {f"seed {s}": figures[f"seed {s}"] for s in seeds}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="The `downstream --task T` run's folder.")
    ap.add_argument("--task", required=True, choices=["instance", "depth", "pose"])
    ap.add_argument("--test-seeds", default="2,1", help="Comma-separated: choose on the first, report another.")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=2000, help="Every model's training steps.")
    ap.add_argument("--recipes", default="finetune,mixed",
                    help="`downstream --joint` values, e.g. finetune:0.75, finetune+real-joints (pose).")
    ap.add_argument("--min-joint-score", type=float, default=None,
                    help="pose: synthetic images teach joints only when every person scores at least this.")
    ap.add_argument("--synthetic", type=Path, default=None,
                    help="Another synthetic labelled folder (e.g. generated with other prompts) in place of the "
                         "run's own; the real-only model is the run's.")
    args = ap.parse_args()

    from datasetdm.errors import DatasetdmError
    from datasetdm.evaluation.downstream import TASK_METRICS, joint_recipe

    recipes = [r for r in args.recipes.split(",") if r]
    for recipe in recipes:
        try:
            joint_recipe(recipe, args.task)
        except DatasetdmError as e:
            raise SystemExit(f"--recipes: {e}") from None
    real, synthetic = args.out / "real", args.synthetic or args.out / f"synthetic-decoder-{args.task}"
    for folder in (real, synthetic):
        if not (folder / "annotations.json").exists():
            raise SystemExit(f"{folder}: missing; run `datasetdm downstream --task {args.task} --out {args.out}` first")
    seeds = [int(s) for s in args.test_seeds.split(",")]
    results = compare(real, synthetic, args.task, seeds, args.n_test, args.steps, recipes,
                      args.out / "joint-recipes", args.min_joint_score,
                      f"-syn-{args.synthetic.name}" if args.synthetic else "")
    metrics = TASK_METRICS[args.task]
    print(f"{'model':<18}" + "".join(f"{f'{m} (seed {s})':>24}" for s in seeds for m in metrics))
    for name, by_seed in results.items():
        print(f"{name:<18}" + "".join(f"{by_seed[f'seed {s}'].get(m, float('nan')):>24.4f}"
                                      for s in seeds for m in metrics))
    print(json.dumps({"task": args.task, "test_seeds": seeds, "n_test": args.n_test, "steps": args.steps,
                      "min_joint_score": args.min_joint_score, "synthetic": str(synthetic), "models": results}))


if __name__ == "__main__":
    from datasetdm.errors import run_script

    run_script(main)
