"""`datasetdm world ...`: render the embedded world to a labelled folder."""

from __future__ import annotations

from pathlib import Path

import typer

world_app = typer.Typer(help="The embedded procedural world (stands in for real labelled data).", no_args_is_help=True)


@world_app.command("render")
def render(
    split: str = typer.Option("train", help="train, val or test; splits never share scenes."),
    n: int = typer.Option(100, min=1, help="Number of scenes."),
    seed: int = typer.Option(0, help="Scene seed; the same split, seed and n give identical files."),
    start: int = typer.Option(0, min=0, help="Index of the first scene (to render a range)."),
    out: Path = typer.Option(..., help="Output labelled folder."),
) -> None:
    """Render scenes with images, captions, semantic and instance masks, keypoints and depth."""
    from rich.progress import Progress

    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.world.render import CATEGORIES, SPLITS, render_scene

    if split not in SPLITS:
        raise typer.BadParameter(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    with Progress() as progress, LabelledFolderWriter(out, list(CATEGORIES)) as writer:
        task = progress.add_task(f"rendering {split}", total=n)
        for index in range(start, start + n):
            writer.add(render_scene(split, seed, index))
            progress.advance(task)
    typer.echo(f"wrote {n} scenes to {out}")


@world_app.command("sheet")
def sheet(
    n: int = typer.Option(6, min=1, help="Number of scenes (rows)."),
    split: str = typer.Option("val", help="Split to draw from."),
    seed: int = typer.Option(0, help="Scene seed."),
    out: Path = typer.Option(Path("docs/world.png"), help="Output PNG."),
) -> None:
    """A contact sheet: each row one scene with its overlays and caption (for the README)."""
    from datasetdm.view import contact_sheet
    from datasetdm.world.render import CATEGORIES, render_scene

    samples = [render_scene(split, seed, i) for i in range(n)]
    contact_sheet(samples, {c.id: c for c in CATEGORIES}, out)
    typer.echo(f"wrote {out}")
