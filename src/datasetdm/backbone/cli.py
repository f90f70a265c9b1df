"""`datasetdm backbone …`: train the embedded backbone (see backbone/train.py for the recipe)."""

from __future__ import annotations

from pathlib import Path

import typer

backbone_app = typer.Typer(help="Train and check the embedded backbone.", no_args_is_help=True)


@backbone_app.command("train")
def train_command(
    run: Path = typer.Option(Path("runs/backbone"), help="Run folder: data, checkpoints, log, export/."),
    max_minutes: float = typer.Option(None, help="Stop the UNet stage after this long (resume later)."),
    threads: int = typer.Option(2, help="CPU threads for torch."),
) -> None:
    """Train VAE then UNet on world images and captions; resumes from RUN if it exists."""
    import torch

    from datasetdm.backbone.train import train

    torch.set_num_threads(threads)
    out = train(run, max_minutes=max_minutes)
    typer.echo(f"exported: {out}")
