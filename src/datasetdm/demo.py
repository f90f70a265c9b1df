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

DEMO_TASKS = ("semantic", "instance", "depth", "pose")


def say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message)


def resolve_backbone(backbone: str | None, work: Path) -> tuple[str, bool]:
    """(backbone source, is_placeholder). Without a committed embedded backbone, a tiny random
    model stands in so the plumbing runs; its labels are meaningless and the demo says so."""
    from datasetdm.backbone.loader import embedded_backbone_path

    if backbone is not None:
        return backbone, False
    embedded = embedded_backbone_path()
    if (embedded / "model_index.json").exists():
        return str(embedded), False
    from datasetdm.backbone.testing import make_tiny_backbone

    path = work / "tiny-random-backbone"
    if not (path / "model_index.json").exists():
        make_tiny_backbone(path, text_encoder="minilm", sample_size=64)
    return str(path), True


def render_world(out: Path, split: str, seed: int, n: int) -> Path:
    """A world labelled folder (skipped when complete)."""
    from datasetdm.formats.labelled_folder import LabelledFolderWriter, read_labelled_folder
    from datasetdm.world.render import CATEGORIES, render_scene

    if (out / "annotations.json").exists():
        folder = read_labelled_folder(out)
        if len(folder) == n:
            return out
    with LabelledFolderWriter(out, list(CATEGORIES), overwrite=True) as writer:
        for index in range(n):
            writer.add(render_scene(split, seed, index))
    return out


def world_prompt_file(path: Path, n: int, seed: int = 0) -> Path:
    """Captions of world val-split scenes, one a line: a prompt file like an LLM would write
    (only the text is used; the scenes' labels never are)."""
    from datasetdm.io import atomic_path
    from datasetdm.world.render import render_scene

    if path.exists():
        return path
    lines = [render_scene("val", seed, i).caption for i in range(n)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def train_decoders(data: Path, out_dir: Path, tasks, backbone: str, iterations: int, show_progress: bool = True) -> dict[str, Path]:
    from datasetdm.training import TrainOptions, train_decoder

    paths = {}
    for task in tasks:
        ckpt = out_dir / task
        if not (ckpt / "config.json").exists():
            say(f"[bold]training the {task} decoder[/bold] on {data}")
            opts = TrainOptions(task=task, iterations=iterations, cache_dir=str(out_dir / "features"))
            train_decoder(data, ckpt, opts, backbone_source=backbone, show_progress=show_progress)
        paths[task] = ckpt
    return paths


def generate_annotated(out: Path, decoders: dict[str, Path], prompts: Path, backbone: str, n: int, seed: int,
                       steps: int, guidance: float, batch_size: int, show_progress: bool = True,
                       min_pixel_confidence: float | None = None):
    from datasetdm.backbone.capture import generate as generate_images
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.decoder import load_decoder
    from datasetdm.generation import Filters, decoder_annotator, generate_dataset
    from datasetdm.generation_cli import _categories, _file_digest
    from datasetdm.prompts import load_prompts

    loaded = [(p, load_decoder(p)) for p in decoders.values()]
    categories = _categories(loaded)
    bb = load_backbone(backbone)
    for _, dec in loaded:
        dec.check_backbone(bb)
    annotators = {dec.cfg.task: decoder_annotator(dec, bb.tokenizer, min_pixel_confidence) for _, dec in loaded}

    def generate_fn(texts, seeds):
        return generate_images(bb, texts, seeds, num_inference_steps=steps, guidance_scale=guidance)

    source = load_prompts(prompts, classes=[c.name for c in categories], seed=seed)
    config = {"steps": steps, "guidance": guidance, "decoders": [_file_digest(p) for p, _ in loaded]}
    if min_pixel_confidence is not None:  # only when set, so runs made before the option still resume
        config["min_pixel_confidence"] = min_pixel_confidence
    return generate_dataset(
        out, generate_fn, annotators, source, categories, n=n, seed=seed, batch_size=batch_size,
        filters=Filters(), backbone=f"{bb.name}@{bb.fingerprint}", config=config,
        resume=(out / "run.json").exists(), progress=show_progress,
    )


def run_demo(out: str | Path, backbone: str | None = None, n_samples: int = 200, n_test: int = 100,
             iterations: int = 600, steps: int = 25, guidance: float = 4.0, batch_size: int = 16,
             tasks=DEMO_TASKS, seed: int = 0, show_progress: bool = True) -> dict:
    from datasetdm.evaluation.evaluate import evaluate_decoder, headline
    from datasetdm.formats.export import export_shards
    from datasetdm.view import build_gallery

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise DatasetdmError(f"--tasks: unknown {unknown}; choose from {', '.join(DEMO_TASKS)}")
    t0 = time.time()
    source, placeholder = resolve_backbone(backbone, out)
    if placeholder:
        say("[bold red]The embedded backbone is not in this checkout yet: running on a tiny RANDOM model.[/bold red]\n"
            "Every stage runs, but images are noise and labels meaningless. Pass --backbone DIR for a real model.")
    say(f"backbone: {source}")
    train_dir = render_world(out / "world" / "train", "train", seed, 100)
    test_dir = render_world(out / "world" / "test", "test", seed, n_test)
    say(f"world: 100 labelled train images in {train_dir}, {n_test} held-out test images in {test_dir}")
    decoders = train_decoders(train_dir, out / "decoders", tasks, source, iterations, show_progress)
    prompts = world_prompt_file(out / "prompts.txt", max(n_samples, 1), seed)
    say(f"[bold]generating {n_samples} annotated samples[/bold] ({steps} steps, guidance {guidance})")
    summary = generate_annotated(out / "shards", decoders, prompts, source, n_samples, seed, steps, guidance,
                                 batch_size, show_progress)
    exported = export_shards(out / "shards", out / "dataset", overwrite=True)
    gallery = build_gallery(out / "dataset", out / "gallery", limit=100)
    say(f"exported {exported} samples to {out / 'dataset'}; gallery: {gallery}")
    metrics = {}
    for task, ckpt in decoders.items():
        m = evaluate_decoder(ckpt, test_dir, out=out / "metrics" / f"{task}.json")
        metrics[task] = headline(m)
    result = {
        "backbone": "tiny-random (placeholder)" if placeholder else source,
        "samples": exported,
        "samples_per_second": round(summary.samples_per_second, 3),
        "minutes": round((time.time() - t0) / 60, 2),
        **{f"{task}_{k}": round(v, 4) for task, m in metrics.items() for k, v in m.items()},
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
