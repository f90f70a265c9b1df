"""The `datasetdm` command line: one command per pipeline stage, plus `demo`.

Each stage keeps its commands next to its code (``<stage>/cli.py`` or a module-level typer app);
this file only mounts them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from datasetdm.backbone.device import DEVICE_HELP, DTYPE_HELP
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

from datasetdm.generation import cli as generation_cli  # noqa: E402
from datasetdm.decoder import cli as decoder_cli  # noqa: E402
from datasetdm.demo import DEMO_TASKS  # noqa: E402
from datasetdm.generation.defaults import GENERATION_STEPS, GUIDANCE_SCALE  # noqa: E402
from datasetdm.embedded.cli import backbone_app  # noqa: E402
from datasetdm.formats.layouts.cli import data_app  # noqa: E402

app.add_typer(world_app, name="world")
app.add_typer(backbone_app, name="backbone")
app.add_typer(data_app, name="data")
app.command("generate")(generation_cli.generate)
app.command("export")(generation_cli.export)
app.command("view")(generation_cli.view)
app.command("prompts")(generation_cli.prompts)
decoder_cli.register(app)  # train, evaluate


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Output folder (re-running continues an interrupted demo)."),
    backbone: Optional[str] = typer.Option(None, help="Diffusers model folder (default: the embedded backbone)."),
    n_samples: int = typer.Option(200, min=1, help="Annotated samples to generate."),
    n_test: int = typer.Option(100, min=1, help="Held-out world images the decoders are scored on."),
    iterations: int = typer.Option(600, min=1, help="Decoder training iterations per task."),
    steps: int = typer.Option(GENERATION_STEPS, min=1, help="Denoising steps."),
    guidance: float = typer.Option(GUIDANCE_SCALE, help="Classifier-free guidance scale."),
    tasks: str = typer.Option(",".join(DEMO_TASKS), help="Decoders to train, comma separated."),
    device: str = typer.Option("auto", help=f"Backbone and decoders: {DEVICE_HELP}."),
    dtype: Optional[str] = typer.Option(None, help=f"Backbone and decoder precision: {DTYPE_HELP}."),
) -> None:
    """The whole pipeline once, offline: world -> decoders -> annotated generation -> export -> gallery -> metrics."""
    from datasetdm.demo import print_summary, run_demo

    result = run_demo(out, backbone=backbone, n_samples=n_samples, n_test=n_test, iterations=iterations,
                      steps=steps, guidance=guidance, tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                      device=device, dtype=dtype)
    print_summary(result)


@app.command()
def downstream(
    test_seed: int = typer.Option(..., min=0, help="Seed of the world test scenes everything is scored on."),
    out: Path = typer.Option(..., help="Output folder: data it builds, results JSON."),
    synthetic: Optional[Path] = typer.Option(None, help="Synthetic labelled folder (an export); default: generate it here."),
    real: Optional[Path] = typer.Option(None, help="Real labelled folder; default: 100 world train images."),
    n_test: int = typer.Option(500, min=1, help="World test scenes."),
    n_synthetic: int = typer.Option(1000, min=1, help="Synthetic samples to generate when --synthetic is not given."),
    labeler: str = typer.Option("decoder", help="How the generated synthetic data is labelled: decoder or attention."),
    backbone: Optional[str] = typer.Option(None, help="Diffusers model folder (default: the embedded backbone)."),
    steps: int = typer.Option(2000, min=1, help="Segmenter training steps (same for all three)."),
    joint: Optional[str] = typer.Option(None, help="The joint model: finetune (the synthetic set for half the "
                                        "steps, then the real set; finetune:R gives the real set a share R of the "
                                        "steps) or mixed (every batch half real, half synthetic); pose: +real-joints "
                                        "learns the joints from the real set only. Default: finetune; mixed with "
                                        "--zero-shot."),
    min_pixel_confidence: Optional[float] = typer.Option(
        None, min=0.0, max=1.0, help="Decoder labels: pixels below this class-score share are ignore (see generate)."),
    min_instance_score: Optional[float] = typer.Option(
        None, min=0.0, max=1.0, help="Instance and pose decoder labels: keep instances scoring at least this "
        "(default 0.5, see generate)."),
    cache: Optional[Path] = typer.Option(None, help="Folder of finished models' figures (default OUT/cache): "
                                         "a rerun resumes; share it between runs to train the real-only model once."),
    models: str = typer.Option("real,synthetic,joint", help="The models to train, comma separated; another one "
                               "is read from --cache or left out (-). Runs sharing --cache can so split the work."),
    device: str = typer.Option("auto", help=f"Backbone and decoders: {DEVICE_HELP}."),
    dtype: Optional[str] = typer.Option(None, help=f"Backbone and decoder precision: {DTYPE_HELP}."),
    task: str = typer.Option("semantic", help="semantic (mIoU), instance (mask AP), depth (AbsRel, delta1) or pose "
                             "(keypoint AP): the decoder that labels the synthetic data and the ordinary model trained."),
    class_quota: Optional[int] = typer.Option(None, min=1, help="Generate with prompts planned so every class is "
                                              "named by at least this many samples (see generate --class-quota)."),
    long_tail: Optional[str] = typer.Option(None, help="Comma-separated tail classes: the real set becomes long-tailed "
                                            "(--head-images per head class, --tail-images per tail class), prompts "
                                            "are its captions, and head / tail mIoU are reported (Table 7)."),
    head_images: int = typer.Option(20, min=1, help="--long-tail: images showing each head class."),
    tail_images: int = typer.Option(2, min=1, help="--long-tail: images showing each tail class."),
    domain: Optional[str] = typer.Option(None, help="Domain shift (supplementary Table 9): real scenes from this "
                                         "setting:lighting only (e.g. grass:sunny), synthetic prompted across all, "
                                         "tested on the other settings and lightings."),
    zero_shot: Optional[str] = typer.Option(None, help="Zero-shot (Table 7): comma-separated unseen classes, their "
                                            "labels removed from the real set and held out of an open-vocab decoder; "
                                            "seen / unseen / harmonic mIoU reported."),
    guidance: float = typer.Option(GUIDANCE_SCALE, help="Generation: classifier-free guidance scale."),
    capture_step: int = typer.Option(-1, help="Generation: the denoising step whose features the decoders read "
                                     "(-1 the last, -2 the one before, ...)."),
    prompts: Optional[str] = typer.Option(None, help="Generation prompts: captions (world val captions), people "
                                          "(world val captions that name a person), templates (class-name "
                                          "templates) or a prompt file or folder. Default: people for --task pose, "
                                          "captions otherwise."),
    semantic_head: str = typer.Option("masks", help="The semantic decoder that labels the synthetic set: masks "
                                      "(mask classification, the paper's) or pixels (a per-pixel classifier)."),
    decoder_seed: int = typer.Option(0, min=0, help="The decoders' training seed (initialisation, batch order); "
                                     "the real set and the generation keep theirs."),
    decoder_iterations: Optional[int] = typer.Option(None, min=1, help="The decoders' training length (default: "
                                                     "train's, 3000 for instance and pose, 1500 for the rest); "
                                                     "a folder's decoders trained for another length are refused."),
) -> None:
    """Train an ordinary model on real, synthetic and both; score each on world test scenes (Tables 2, 4, 7)."""
    from datasetdm.evaluation.downstream import DownstreamConfig, build_and_run

    result = build_and_run(out, test_seed=test_seed, n_test=n_test, real=real, synthetic=synthetic,
                           n_synthetic=n_synthetic, labeler=labeler, backbone=backbone,
                           config=DownstreamConfig(steps=steps), cache_dir=cache,
                           min_pixel_confidence=min_pixel_confidence, device=device, dtype=dtype, task=task,
                           class_quota=class_quota, head_images=head_images, tail_images=tail_images,
                           long_tail=[c.strip() for c in long_tail.split(",") if c.strip()] if long_tail else (),
                           domain=domain,
                           zero_shot=[c.strip() for c in zero_shot.split(",") if c.strip()] if zero_shot else (),
                           guidance=guidance, capture_step=capture_step, prompts=prompts,
                           semantic_head=semantic_head, decoder_seed=decoder_seed,
                           min_instance_score=min_instance_score, decoder_iterations=decoder_iterations,
                           joint=joint, models=[m.strip() for m in models.split(",") if m.strip()])
    typer.echo(result.pop("table"))
    typer.echo(json.dumps(result))


@app.command()
def edit(
    run: Path = typer.Argument(..., help="A generate run (shard folder) labelled by decoders."),
    sample: int = typer.Option(..., "--sample", min=0, help="Sample id to edit (a kept one)."),
    swap: list[str] = typer.Option(..., "--swap", help="OLD=NEW word swap in the prompt, e.g. red=blue; repeatable."),
    out: Path = typer.Option(..., help="Output folder: samples/ (before, after), edit.json, gallery/."),
    decoder: list[Path] = typer.Option([], "--decoder", help="The run's decoder checkpoints, in its order."),
    backbone: Optional[str] = typer.Option(None, help="The run's backbone (default: the embedded backbone)."),
    cross_steps: float = typer.Option(0.8, min=0.0, max=1.0, help="Share of the first steps whose cross-attention "
                                      "maps come from the source prompt (prompt-to-prompt)."),
    self_steps: float = typer.Option(0.4, min=0.0, max=1.0, help="Share of the first steps whose self-attention "
                                     "comes from the source."),
    overwrite: bool = typer.Option(False, help="Replace OUT."),
) -> None:
    """Edit a generated sample with labels (paper Fig. 4): the same seed, a word of its prompt swapped,
    the layout kept through the source's attention maps (prompt-to-prompt), relabelled by the run's
    decoders. The last line is JSON (semantic agreement of the edit with the original)."""
    from datasetdm.generation.edit import edit_sample, parse_swaps, summary_line, write_edit
    from datasetdm.view import write_gallery

    result = edit_sample(run, sample, parse_swaps(swap), decoder, backbone=backbone, cross_fraction=cross_steps,
                         self_fraction=self_steps)
    write_edit(out, result, overwrite=overwrite, gallery=write_gallery)
    typer.echo(f"{out}: {result.prompt!r} -> {result.edited_prompt!r}; gallery {out / 'gallery' / 'index.html'}")
    typer.echo(summary_line(result))


def main() -> None:
    """Every user-facing failure is one line and exit status 2: a DatasetdmError (bad input), or an
    OSError (read-only or full disk, missing permission) named by its path. DATASETDM_DEBUG=1 shows
    the traceback instead. Usage errors are typer's own (exit 2)."""
    import os

    try:
        app()
    except (DatasetdmError, OSError) as err:
        if os.environ.get("DATASETDM_DEBUG"):
            raise
        if isinstance(err, DatasetdmError):
            message = str(err)
        else:
            message = f"{err.filename or 'datasetdm'}: {err.strerror or err}"
        message = " ".join(message.split())  # one line, whatever a library put in the text
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
