"""`datasetdm world ...`: render the embedded world to a labelled folder."""

from __future__ import annotations

from pathlib import Path

import typer

world_app = typer.Typer(help="The embedded procedural world (stands in for real labelled data).", no_args_is_help=True)


@world_app.command("render")
def render(
    split: str = typer.Option("train", help="train, val or test; splits never share scenes."),
    n: int = typer.Option(100, min=1, help="Number of scenes."),
    seed: int = typer.Option(0, min=0, help="Scene seed; the same split, seed and n give identical files."),
    start: int = typer.Option(0, min=0, help="Index of the first scene (to render a range)."),
    out: Path = typer.Option(..., help="Output labelled folder."),
    preset: str = typer.Option("default", help="World preset: default (v2: 1-3 large objects, VOC-like) "
                               "or crowded (v1: 1-6 small objects, COCO-like)."),
    overwrite: bool = typer.Option(False, help="Replace a labelled folder already in OUT."),
) -> None:
    """Render scenes with images, captions, semantic and instance masks, keypoints and depth."""
    from datasetdm.progress import progress_bar

    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.world.render import CATEGORIES, render_scene, scene_stats

    _check(split, preset)
    samples = []
    with progress_bar() as progress, LabelledFolderWriter(out, list(CATEGORIES), overwrite=overwrite) as writer:
        task = progress.add_task(f"rendering {split}", total=n)
        for index in range(start, start + n):
            sample = render_scene(split, seed, index, preset)
            writer.add(sample)
            samples.append(sample)
            progress.advance(task)
    stats = scene_stats(samples)
    typer.echo(f"wrote {n} scenes to {out}: {stats['objects_per_image']} objects per image, median instance "
               f"{100 * stats['median_instance_area']:.1f}% of the image")


@world_app.command("long-tail")
def long_tail(
    out: Path = typer.Option(..., help="Output labelled folder."),
    tail: str = typer.Option(..., help="Comma-separated tail classes (e.g. ball,star,barrel)."),
    head_images: int = typer.Option(20, min=1, help="Images showing each head class (the paper's 20)."),
    tail_images: int = typer.Option(2, min=1, help="Images showing each tail class (the paper's 2)."),
    split: str = typer.Option("train", help="train, val or test."),
    seed: int = typer.Option(0, min=0, help="Scene seed."),
    preset: str = typer.Option("default", help="World preset."),
    overwrite: bool = typer.Option(False, help="Replace a labelled folder already in OUT."),
) -> None:
    """A long-tail few-shot set (paper Table 7): scenes taken in order while every class they show
    is below its cap, until each head class shows in --head-images and each tail class in
    --tail-images of them. The last line is JSON with the class counts."""
    import json

    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.world.folders import class_image_counts, long_tail_scenes
    from datasetdm.world.render import CATEGORIES

    _check(split, preset)
    names = [c.strip() for c in tail.split(",") if c.strip()]
    scenes = long_tail_scenes(split, seed, names, head_images, tail_images, preset)
    with LabelledFolderWriter(out, list(CATEGORIES), overwrite=overwrite) as writer:
        for scene in scenes:
            writer.add(scene)
    typer.echo(f"wrote {len(scenes)} scenes to {out}")
    typer.echo(json.dumps({"images": len(scenes), "tail": names, "class_images": class_image_counts(scenes)}))


def _check(split: str, preset: str) -> None:
    from datasetdm.world.render import PRESETS, SPLITS

    if split not in SPLITS:
        raise typer.BadParameter(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


@world_app.command("stats")
def stats(
    split: str = typer.Option("test", help="train, val or test."),
    n: int = typer.Option(400, min=1, help="Number of scenes to measure."),
    seed: int = typer.Option(0, min=0, help="Scene seed."),
    preset: str = typer.Option("default", help="World preset."),
) -> None:
    """Object count and size distribution of a split; the last line is JSON."""
    import json

    from datasetdm.world.render import render_scene, scene_stats

    _check(split, preset)
    result = scene_stats([render_scene(split, seed, i, preset) for i in range(n)])
    typer.echo(json.dumps({"preset": preset, "split": split, "seed": seed, **result}))


@world_app.command("sheet")
def sheet(
    n: int = typer.Option(6, min=1, help="Number of scenes (rows)."),
    split: str = typer.Option("val", help="Split to draw from."),
    seed: int = typer.Option(0, min=0, help="Scene seed."),
    out: Path = typer.Option(Path("docs/world.png"), help="Output PNG."),
    preset: str = typer.Option("default", help="World preset."),
) -> None:
    """A contact sheet: each row one scene with its overlays and caption (for the README)."""
    from datasetdm.view import contact_sheet
    from datasetdm.world.render import CATEGORIES, render_scene

    _check(split, preset)
    samples = [render_scene(split, seed, i, preset) for i in range(n)]
    contact_sheet(samples, {c.id: c for c in CATEGORIES}, out)
    typer.echo(f"wrote {out}")
