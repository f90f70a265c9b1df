"""Long-tail segmentation (paper §4, Table 7): head / tail mIoU with and without per-class quotas.

The real few-shot set is long-tailed (``world.folders.long_tail_scenes``: head classes in 20
images each, the --tail classes in 2). Decoders are trained on it, and synthetic data is generated
twice with its captions as prompts: as they come (the tail stays rare in the synthetic data too),
and with ``--class-quota`` (every class named by at least QUOTA samples). For each, the ordinary
downstream segmenter is trained on real, synthetic and joint data (the real-only model once: the
runs share OUT/cache) and scored on held-out world test scenes; the table gives head and tail
mIoU and how many synthetic images show each tail class.

    python bench/long_tail.py --out runs/long-tail --test-seed 1            # the full setting, hours on 2 cores
    python bench/long_tail.py --out runs/long-tail --test-seed 1 --joint mixed   # only the joint models train
    python bench/long_tail.py --out /tmp/lt --tiny                          # plumbing only, minutes
    python bench/long_tail.py --table docs/long-tail-finetune.json          # the README table from saved lines

Two runners: once OUT's data exist, copy OUT and run ``--joint mixed --models joint --cache OUT/cache`` in
the copy beside the first run; each trains its own models into the shared cache.

The last printed line is JSON: per run (``no_quota``, ``quota``) the downstream headline with
``real/synthetic/joint_head_miou`` and ``_tail_miou``. Before it, the README's markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def markdown_table(*lines: dict) -> str:
    """The README's long-tail table from the bench's last lines (one per joint recipe): head / tail
    mIoU per model. Rows of a joint recipe other than downstream's default say which."""
    from datasetdm.evaluation.downstream import default_joint

    def pair(run: dict, model: str) -> str:
        head, tail = run.get(f"{model}_head_miou"), run.get(f"{model}_tail_miou")
        return " / ".join("–" if v is None else f"{v:.3f}" for v in (head, tail))

    first = lines[0]
    shots = f"; {first['tail_images']} images each" if "tail_images" in first else ""
    rows = [f"| long-tail (tail: {', '.join(first['tail'])}{shots}) | real head / tail mIoU | "
            "synthetic head / tail | joint head / tail | synthetic images per tail class |",
            "|---|---|---|---|---|"]
    for line in lines:
        recipe = line.get("joint") or "mixed"  # lines saved before the key (session 24) were mixed
        for name in ("no_quota", "quota"):
            if name in line:
                run, counts = line[name], line["synthetic_tail_images"][name]
                label = (f"… with `--class-quota {run['class_quota']}`" if run.get("class_quota")
                         else "synthetic prompted with the set's captions")
                if recipe != default_joint():
                    label += f", `--joint {recipe}`"
                rows.append(f"| {label} | {pair(run, 'real')} | {pair(run, 'synthetic')} | {pair(run, 'joint')} | "
                            f"{' / '.join(str(counts[c]) for c in first['tail'])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", type=Path, nargs="+", default=None,
                    help="Print the README table from saved last lines (one file per joint recipe); no run.")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--test-seed", type=int, default=1)
    ap.add_argument("--tail", default="ball,star,barrel,cone", help="Comma-separated tail classes.")
    ap.add_argument("--head-images", type=int, default=20)
    ap.add_argument("--tail-images", type=int, default=2)
    ap.add_argument("--quota", type=int, default=150,
                    help="Samples naming each class, at least (quota run); 150 of 1000 fits the default tail.")
    ap.add_argument("--n-synthetic", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=2000, help="Segmenter training steps.")
    ap.add_argument("--decoder-iterations", type=int, default=None, help="default: datasetdm train's for the task")
    ap.add_argument("--backbone", default=None, help="Default: the embedded backbone.")
    ap.add_argument("--joint", default=None,
                    help="The joint model's recipe (downstream --joint); default: downstream's with --long-tail.")
    ap.add_argument("--cache", type=Path, default=None, help="Finished models' figures (default OUT/cache).")
    ap.add_argument("--models", default="real,synthetic,joint",
                    help="Models to train (downstream --models); another runner sharing --cache trains the rest.")
    ap.add_argument("--tiny", action="store_true", help="Tiny sizes: checks the plumbing, measures nothing.")
    args = ap.parse_args()
    if args.table is not None:
        print(markdown_table(*(json.loads(path.read_text()) for path in args.table)))
        return
    if args.out is None:
        ap.error("--out is required (or --table FILE)")
    if args.tiny:
        args.head_images, args.tail_images, args.quota = 3, 1, 2
        args.n_synthetic, args.n_test, args.steps, args.decoder_iterations = 24, 8, 5, 5

    from datasetdm.evaluation.downstream import DownstreamConfig, build_and_run, joint_recipe, plan_long_tail_quota
    from datasetdm.world.folders import render_long_tail_folder

    tail = [c.strip() for c in args.tail.split(",") if c.strip()]
    if args.joint is not None:
        joint_recipe(args.joint, "semantic")
    # the quota run comes second, hours in: check now that its plan fits --n-synthetic (same real set: seed 0)
    with tempfile.TemporaryDirectory() as tmp:
        real = render_long_tail_folder(Path(tmp) / "real", "train", 0, tail, args.head_images, args.tail_images)
        plan_long_tail_quota(real, args.quota, args.n_synthetic)
    runs = {}
    for name, quota in (("no_quota", None), ("quota", args.quota)):
        result = build_and_run(args.out, test_seed=args.test_seed, n_test=args.n_test, n_synthetic=args.n_synthetic,
                               backbone=args.backbone, config=DownstreamConfig(steps=args.steps),
                               decoder_iterations=args.decoder_iterations, class_quota=quota, long_tail=tail,
                               head_images=args.head_images, tail_images=args.tail_images, joint=args.joint,
                               cache_dir=args.cache, models=args.models.split(","))
        print(f"== {name} ==")
        print(result.pop("table"))
        runs[name] = result
    counts = {}
    for name, r in runs.items():
        saved = json.loads(Path(r["result_file"]).read_text())
        counts[name] = {c: saved["synthetic_class_images"][c] for c in tail}
    print(f"{'':<10}{'real head':>10}{'real tail':>10}{'joint head':>11}{'joint tail':>11}  synthetic images per tail class")
    for name, r in runs.items():
        cells = "".join(f"{'-' if r.get(k) is None else format(r[k], '.4f'):>{w}}" for k, w in (
            ("real_head_miou", 10), ("real_tail_miou", 10), ("joint_head_miou", 11), ("joint_tail_miou", 11)))
        print(f"{name:<10}{cells}  {counts[name]}")
    line = {"tail": tail, "class_quota": args.quota, "joint": runs["no_quota"]["joint"], "head_images": args.head_images, "tail_images": args.tail_images,
            "synthetic_tail_images": counts, **runs}
    print(markdown_table(line))
    print(json.dumps(line))


if __name__ == "__main__":
    from datasetdm.errors import run_script

    run_script(main)
