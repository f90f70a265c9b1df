"""`datasetdm data import|merge` and the body of `datasetdm export --format`: the standard
layouts in and out (app layer; the library is ``datasetdm.formats.layouts``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from datasetdm.formats.layouts import EXPORT_FORMATS, IMPORT_FORMATS

data_app = typer.Typer(help="Your own data: import VOC, COCO, Cityscapes, ADE20K or NYU; merge folders.",
                       no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _names(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(c.strip() for c in text.split(",") if c.strip()) if text else None


@data_app.command("import")
def import_command(
    src: Path = typer.Argument(..., help="The data set's folder as it ships (VOC: the VOC2012 folder; COCO: the "
                               "folder holding annotations/ and train2017/; Cityscapes: leftImg8bit/ + gtFine/; "
                               "ADE20K: ADEChallengeData2016; NYU: rgb_*/sync_depth_* pairs or images/ + depth/)."),
    format: str = typer.Option(..., "--format", help=f"one of: {', '.join(IMPORT_FORMATS)}"),
    out: Path = typer.Option(..., "--out", help="Labelled folder to write (new or empty, unless --overwrite)."),
    split: str = typer.Option("train", "--split", help="train or val (VOC also trainval); NYU: not used."),
    per_class: Optional[int] = typer.Option(None, "--per-class", min=1,
                                            help="Few-shot: K images per class, every class present (VOC 5 -> 100)."),
    n_images: Optional[int] = typer.Option(None, "--n-images", min=1, help="Few-shot: N images (NYU 50, COCO persons 800)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the few-shot selection (same seed, same images)."),
    classes: Optional[str] = typer.Option(None, "--classes",
                                          help="Comma-separated classes to keep (others become background), e.g. person."),
    depth_scale: float = typer.Option(0.001, "--depth-scale", help="NYU: metres per unit of the 16-bit depth PNGs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what an earlier import wrote in OUT."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Import a data set as it ships into a labelled folder (optionally a few-shot selection).
    The last line printed is one JSON object."""
    from datasetdm.formats.layouts import ImportOptions, import_dataset

    options = ImportOptions(split=split, per_class=per_class, n_images=n_images, seed=seed,
                            classes=_names(classes), depth_scale=depth_scale)
    summary = import_dataset(format, src, out, options, overwrite=overwrite, show_progress=progress)
    for note in summary.notes:
        typer.echo(f"note: {note}", err=True)
    for name, count in summary.shortfall.items():
        typer.echo(f"note: class {name!r}: only {count} images (asked {per_class})", err=True)
    typer.echo(json.dumps({"out": str(out), "format": format, "samples": summary.samples,
                           "available": summary.available, "classes": len(summary.categories)}))


@data_app.command("merge")
def merge_command(
    sources: list[Path] = typer.Argument(..., help="Labelled folders or generate run folders (two or more)."),
    out: Path = typer.Option(..., "--out", help="Merged labelled folder to write."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Comma-separated sample-id prefixes, one per source "
                                         "(default: the folder names)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what an earlier merge wrote in OUT."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Merge labelled folders (real + synthetic): classes matched by name, ids remapped, sample ids prefixed."""
    from datasetdm.formats.layouts import merge_folders

    summary = merge_folders(sources, out, prefixes=_names(prefix), overwrite=overwrite, show_progress=progress)
    for note in summary.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(json.dumps({"out": str(out), "samples": summary.samples, "per_source": summary.per_source,
                           "classes": [c.name for c in summary.categories]}))


def export_layout(source: Path, out: Path, format: str, split: str, annotator: Optional[str], limit: Optional[int],
                  overwrite: bool, progress: bool) -> None:
    """`datasetdm export --format F`: ``export_dataset``, the one exporter, for every F and source."""
    from datasetdm.errors import DatasetdmError
    from datasetdm.formats.layouts import export_dataset

    if format not in EXPORT_FORMATS:
        raise DatasetdmError(f"--format {format!r}: unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    summary = export_dataset(source, out, format, split=split, annotator=annotator, limit=limit,
                             overwrite=overwrite, show_progress=progress)
    for note in summary.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"exported {summary.samples} samples to {out} ({format})")
