"""Ablations of the synthetic data (paper §4, Table 6; issue 22 item 5), one bench per ablation.

Each varies one generation setting and trains the ordinary downstream model (``datasetdm
downstream``: from scratch on real, synthetic and joint data, scored on held-out world test
scenes) for every value; the other settings stay at the defaults (1000 samples, world captions,
guidance 4, features of the last denoising step):

- ``size``: synthetic samples (250 / 1000 / 4000);
- ``prompts``: prompt source — class-name templates, the world's captions, an LLM-style prompt file
  (``bench/prompts/world-llm.txt``, hand-written in that style; see its header);
- ``guidance``: classifier-free guidance scale (1 = none / 2 / 4 / 7.5);
- ``timestep``: the denoising step whose UNet features the decoders read (``--capture-step``,
  Python indexing over the 25 steps: -1 is the last, t = 1, what DatasetDM reads). The decoders are
  trained once, on real images noised to t = 1 (paper §3.3), so an earlier step also measures how
  far their features drift from what they learnt.

All runs go through ``evaluation.downstream.build_and_run`` in one ``--out``: the decoders, the
real set and the real-only model (``OUT/cache``) are built once and shared by every value and
every ablation (the default setting's run too, e.g. size 1000 = captions = guidance 4 = step -1).
A value away from the default gets its own shard, synthetic and result names (``-n250``,
``-g7.5``, ``-capture-2``, ``-prompts-templates``).

    python bench/ablations.py --ablation size --out runs/ablations --test-seed 1      # ~70 min+ on 2 cores
    python bench/ablations.py --ablation prompts --out runs/ablations --test-seed 1
    python bench/ablations.py --ablation guidance --out runs/ablations --test-seed 1
    python bench/ablations.py --ablation timestep --out runs/ablations --test-seed 1
    python bench/ablations.py --ablation size --out /tmp/abl --tiny                   # plumbing only, minutes
    python bench/ablations.py --table docs/ablation-size.json docs/ablation-prompts.json   # README rows, no run

Two cores on one setting: ``--models real,synthetic`` here and, once the setting's synthetic folder
exists, ``datasetdm downstream --models joint --cache OUT/cache --real OUT/real --synthetic
OUT/synthetic-decoder-g2 --out OTHER --test-seed 1`` beside it; a rerun of the bench with every
model then reads all three from the cache.

The last printed line is JSON: ``ablation``, ``task``, ``metric`` and ``settings``, one entry per
value with the downstream headline (``real_miou``, ``synthetic_miou``, ``joint_miou`` for
semantic), ``n_synthetic``, the run's ``shards`` folder and ``result_file``. Before it, the
ablation's row of the README table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLM_PROMPTS = HERE / "prompts" / "world-llm.txt"
ABLATIONS = ("size", "prompts", "guidance", "timestep")
DEFAULT_VALUES = {"size": "250,1000,4000", "prompts": f"templates,captions,{LLM_PROMPTS}",
                  "guidance": "1,2,4,7.5", "timestep": "-1,-2,-4,-8"}
TINY_VALUES = {"size": "2,4", "prompts": f"templates,captions,{LLM_PROMPTS}", "guidance": "1,4",
               "timestep": "-1,-2"}


def parse_values(ablation: str, text: str) -> list:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if ablation == "size" or ablation == "timestep":
        return [int(v) for v in items]
    if ablation == "guidance":
        return [float(v) for v in items]
    return items


def setting_kwargs(ablation: str, value) -> dict:
    """``build_and_run``'s keyword for one value of the ablation."""
    return {"size": {"n_synthetic": value}, "prompts": {"prompts": value}, "guidance": {"guidance": value},
            "timestep": {"capture_step": value}}[ablation]


ROW_LABELS = {"size": "synthetic set size", "prompts": "prompt source", "guidance": "guidance scale",
              "timestep": "capture step (t)"}


def value_name(ablation: str, setting: dict) -> str:
    if ablation == "prompts":
        name = Path(str(setting["value"])).name
        return {"templates": "templates", "captions": "captions", "people": "people"}.get(name, f"`{name}`")
    if ablation == "timestep":
        return f"{setting['value']} (t = {setting['timestep']})"
    return f"{setting['value']:g}" if isinstance(setting["value"], float) else str(setting["value"])


def markdown_row(line: dict) -> str:
    """The README ablation table's row from a bench's last line: values and figures joined by " / "."""
    metric = line["metric"]
    settings = line["settings"]

    def joined(model: str) -> str:
        return " / ".join("–" if s.get(f"{model}_{metric}") is None else f"{s[f'{model}_{metric}']:.3f}"
                          for s in settings)

    values = " / ".join(value_name(line["ablation"], s) for s in settings)
    return f"| {ROW_LABELS[line['ablation']]} | {values} | {joined('real')} | {joined('synthetic')} | {joined('joint')} |"


def capture_timesteps(backbone: str | None, steps: int, capture_steps: list[int]) -> dict[int, int]:
    """The scheduler timestep t of each capture step (what the step index means)."""
    import diffusers

    from datasetdm.backbone.loader import embedded_backbone_path

    folder = Path(backbone) if backbone else embedded_backbone_path()
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)  # the class generate builds
    scheduler.set_timesteps(steps)
    return {c: int(scheduler.timesteps[c]) for c in capture_steps}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ablation", choices=ABLATIONS, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None,
                    help="Print the README rows from saved last lines (JSON files); no run.")
    ap.add_argument("--values", default=None, help="Comma-separated values (default: the paper-sized set above).")
    ap.add_argument("--out", type=Path, default=None, help="Shared by every ablation: decoders, real set, cache.")
    ap.add_argument("--test-seed", type=int, default=1)
    ap.add_argument("--task", default="semantic", help="downstream --task (the paper's Table 6: semantic).")
    ap.add_argument("--n-synthetic", type=int, default=1000, help="Samples of every run but the size ablation's.")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=2000, help="Downstream model training steps.")
    ap.add_argument("--decoder-iterations", type=int, default=None, help="default: datasetdm train's for the task")
    ap.add_argument("--generation-steps", type=int, default=None, help="Denoising steps (default generate's, 25).")
    ap.add_argument("--real", type=Path, default=None, help="Real labelled folder (default: 100 world train scenes).")
    ap.add_argument("--backbone", default=None, help="Default: the embedded backbone.")
    ap.add_argument("--cache", type=Path, default=None, help="Finished models' figures (default OUT/cache).")
    ap.add_argument("--models", default="real,synthetic,joint",
                    help="Models to train (downstream --models); another runner sharing the cache trains the rest.")
    ap.add_argument("--tiny", action="store_true", help="Tiny sizes: checks the plumbing, measures nothing.")
    args = ap.parse_args(argv)
    if args.table:
        for path in args.table:
            print(markdown_row(json.loads(path.read_text())))
        return {}
    if args.ablation is None or args.out is None:
        ap.error("--ablation and --out are required (or --table FILE…)")

    from datasetdm.evaluation.downstream import TASK_METRICS, DownstreamConfig, build_and_run
    from datasetdm.generation.defaults import GENERATION_STEPS

    generation_steps = args.generation_steps or GENERATION_STEPS
    if args.tiny:
        args.n_synthetic, args.n_test, args.steps, args.decoder_iterations = 4, 4, 3, 3
        generation_steps = args.generation_steps or 4
        if args.real is None:  # 8 scenes instead of 100: the decoders' feature pass is the cost
            from datasetdm.world.folders import render_world_folder

            args.real = render_world_folder(args.out / "real-tiny", "train", 0, 8)
    values = parse_values(args.ablation, args.values or (TINY_VALUES if args.tiny else DEFAULT_VALUES)[args.ablation])
    metric = TASK_METRICS[args.task][0]
    config = DownstreamConfig(steps=args.steps, batch_size=4 if args.tiny else DownstreamConfig.batch_size)
    timesteps = capture_timesteps(args.backbone, generation_steps, values) if args.ablation == "timestep" else {}

    settings = []
    for value in values:
        kwargs = {"n_synthetic": args.n_synthetic, **setting_kwargs(args.ablation, value)}
        result = build_and_run(args.out, test_seed=args.test_seed, n_test=args.n_test, real=args.real,
                               backbone=args.backbone, config=config, decoder_iterations=args.decoder_iterations,
                               cache_dir=args.cache, task=args.task, generation_steps=generation_steps,
                               models=args.models.split(","), **kwargs)
        print(f"== {args.ablation} = {value} ==")
        print(result.pop("table"))
        saved = json.loads(Path(result["result_file"]).read_text())
        entry = {"value": value, **result, "shards": saved["generation"]["shards"]}
        if args.ablation == "timestep":
            entry["timestep"] = timesteps[value]
        settings.append(entry)

    label = {"size": "samples", "prompts": "prompt source", "guidance": "guidance", "timestep": "capture step (t)"}
    print(f"\n{label[args.ablation]:<28}{'synthetic':>10}{'real':>10}{'synthetic':>11}{'joint':>10}   ({metric})")
    for s in settings:
        name = Path(str(s["value"])).name if args.ablation == "prompts" else str(s["value"])
        if args.ablation == "timestep":
            name += f" (t={s['timestep']})"
        cells = "".join(f"{'-' if s[k] is None else format(s[k], '.4f'):>{w}}" for k, w in (
            (f"real_{metric}", 10), (f"synthetic_{metric}", 11), (f"joint_{metric}", 10)))
        print(f"{name:<28}{s['n_synthetic']:>10}{cells}")
    line = {"ablation": args.ablation, "task": args.task, "metric": metric,
            "values": [str(v) if args.ablation == "prompts" else v for v in values], "settings": settings}
    print(markdown_row(line))
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    from datasetdm.errors import run_script

    run_script(main)
