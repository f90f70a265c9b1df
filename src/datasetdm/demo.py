"""`datasetdm demo`: the whole text-to-data pipeline once, offline, on the embedded default.

1. render the embedded world: 100 labelled train images (the "few labelled ones") and held-out
   test images;
2. train one P-Decoder per task on the 100 images (hypercolumns cached once);
3. write a prompt file of world-style captions (what an LLM prompt file would hold), generate
   annotated samples, every decoder labelling each image from the same hypercolumns;
4. export the shards to a labelled folder (COCO JSON, palettized PNGs, uint16 depth), write
   the HTML gallery;
5. evaluate each decoder on the held-out images and print a summary, its figures last as one
   JSON line.

Every step writes its output atomically and is skipped when its output is already there, so
running the command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from datasetdm.errors import DatasetdmError
from datasetdm.generation.defaults import GENERATION_BATCH, GENERATION_STEPS, GUIDANCE_SCALE

DEMO_TASKS = ("semantic", "instance", "depth", "pose")


def say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message)


def resolve_backbone(backbone: str | None) -> str:
    """The backbone to run: ``backbone`` if given, else the embedded one shipped in the package."""
    from datasetdm.backbone.loader import embedded_backbone_path

    if backbone is not None:
        return backbone
    embedded = embedded_backbone_path()
    if not (embedded / "model_index.json").exists():
        raise DatasetdmError(f"{embedded}: the embedded backbone is missing from this install; pass --backbone DIR")
    return str(embedded)


def run_demo(out: str | Path, backbone: str | None = None, n_samples: int = 200, n_test: int = 100,
             iterations: int = 600, steps: int = GENERATION_STEPS, guidance: float = GUIDANCE_SCALE,
             batch_size: int = GENERATION_BATCH, tasks=DEMO_TASKS, seed: int = 0, show_progress: bool = True,
             device: str = "auto", dtype: str | None = None) -> dict:
    from datasetdm.io import output_lock

    out = Path(out)
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise DatasetdmError(f"--tasks: unknown {unknown}; choose from {', '.join(DEMO_TASKS)}")
    with output_lock(out):  # two demos in one folder would train and generate over each other
        out.mkdir(parents=True, exist_ok=True)
        return _run_demo(out, backbone, n_samples, n_test, iterations, steps, guidance, batch_size, tasks, seed,
                         show_progress, device, dtype)


def _run_demo(out: Path, backbone, n_samples, n_test, iterations, steps, guidance, batch_size, tasks, seed,
              show_progress, device="auto", dtype=None) -> dict:
    from datasetdm.evaluation.evaluate import evaluate_decoder, headline
    from datasetdm.formats.export import export_shards
    from datasetdm.generation.setup import generate_labelled
    from datasetdm.training import train_decoders
    from datasetdm.view import build_gallery
    from datasetdm.world.folders import render_world_folder, world_prompt_file

    t0 = time.time()
    source = resolve_backbone(backbone)
    say(f"backbone: {source}")
    train_dir = render_world_folder(out / "world" / "train", "train", seed, 100)
    test_dir = render_world_folder(out / "world" / "test", "test", seed, n_test)
    say(f"world: 100 labelled train images in {train_dir}, {n_test} held-out test images in {test_dir}")
    decoders = train_decoders(train_dir, out / "decoders", tasks, source, iterations, show_progress, log=say,
                              device=device, dtype=dtype)
    prompts = world_prompt_file(out / "prompts.txt", max(n_samples, 1), seed)
    say(f"[bold]generating {n_samples} annotated samples[/bold] ({steps} steps, guidance {guidance})")
    summary = generate_labelled(out / "shards", backbone=source, decoders=list(decoders.values()), prompts=prompts,
                                n=n_samples, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size,
                                show_progress=show_progress, device=device, dtype=dtype)
    exported = export_shards(out / "shards", out / "dataset", overwrite=True)
    gallery = build_gallery(out / "dataset", out / "gallery", limit=100)
    say(f"exported {exported} samples to {out / 'dataset'}; gallery: {gallery}")
    metrics = {}
    for task, ckpt in decoders.items():
        m = evaluate_decoder(ckpt, test_dir, out=out / "metrics" / f"{task}.json", device=device, dtype=dtype)
        metrics[task] = headline(m)
    result = {
        "backbone": source,
        "samples": exported,
        "samples_per_second": round(summary.samples_per_second, 3),
        "minutes": round((time.time() - t0) / 60, 2),
        **{f"{task}_{k}": None if v is None else round(v, 4) for task, m in metrics.items() for k, v in m.items()},
    }
    return result


def print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="datasetdm demo: decoders trained on 100 world images, scored on held-out ones")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, str(v))
    Console(stderr=True).print(table)
    print(json.dumps(result), flush=True)
