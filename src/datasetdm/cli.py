"""The `datasetdm` command line: one command per pipeline stage, plus `demo`.

Each stage keeps its commands next to its code (``<stage>/cli.py`` or a module-level typer app);
this file only mounts them.
"""

from __future__ import annotations

import sys

import typer

from datasetdm.errors import DatasetdmError

app = typer.Typer(
    help="Text-to-data with diffusion models: turn ~100 labelled images into an unlimited labelled dataset.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the package version."""
    from datasetdm import __version__

    typer.echo(__version__)


# Stage command groups; each stage keeps its commands next to its code.
from datasetdm.world.cli import world_app  # noqa: E402

from datasetdm import generation_cli  # noqa: E402
from datasetdm.backbone.cli import backbone_app  # noqa: E402

app.add_typer(world_app, name="world")
app.add_typer(backbone_app, name="backbone")
app.command("generate")(generation_cli.generate)
app.command("export")(generation_cli.export)
app.command("view")(generation_cli.view)
app.command("prompts")(generation_cli.prompts)


def main() -> None:
    try:
        app()
    except DatasetdmError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
