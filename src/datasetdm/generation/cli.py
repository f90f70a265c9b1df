"""Commands of the text-to-data stage, as plain typer-annotated functions the CLI mounts:
``generate``, ``export``, ``view`` and ``prompts`` (the LLM prompt builder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from datasetdm.backbone.device import DEVICE_HELP, DTYPE_HELP
from datasetdm.errors import DatasetdmError
from datasetdm.generation.defaults import GENERATION_BATCH, GENERATION_STEPS, GUIDANCE_SCALE


def generate(
    decoder: list[Path] = typer.Option([], "--decoder", help="Trained decoder checkpoint; repeat for several (each labels every image)."),
    labeler: str = typer.Option("decoder", help="decoder (P-Decoders from --decoder) or attention (training-free, Dataset Diffusion; needs --classes)."),
    tau: int = typer.Option(4, help="attention labeler: self-attention exponent."),
    label_threshold: float = typer.Option(0.6, help="attention labeler: normalised attention at or above this is labelled."),
    ignore_threshold: float = typer.Option(0.5, help="attention labeler: from here to --label-threshold is ignore (255)."),
    out: Path = typer.Option(..., help="Output folder: WebDataset shards + manifest.parquet."),
    n: int = typer.Option(100, min=0, help="Number of samples to generate (sample ids 0..n-1)."),
    seed: int = typer.Option(0, min=0, help="Run seed; each sample's seed is derived from (seed, sample id)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file, or folder with one {class}.txt per class."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated classes for template prompts (default: the decoders' classes)."),
    batch_size: int = typer.Option(GENERATION_BATCH, min=1, help="Images generated together; does not change the output."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in OUT."),
    backbone: Optional[str] = typer.Option(None, help="Diffusers model folder or hub id (default: the embedded backbone)."),
    steps: int = typer.Option(GENERATION_STEPS, min=1, help="Denoising steps."),
    guidance: float = typer.Option(GUIDANCE_SCALE, help="Classifier-free guidance scale (1 = off)."),
    samples_per_shard: int = typer.Option(1000, min=1, help="Sample ids per tar shard."),
    min_confidence: Optional[float] = typer.Option(None, help="Drop samples whose mean annotator confidence is lower."),
    min_area: Optional[float] = typer.Option(None, help="Drop samples whose labelled fraction of the image is lower."),
    min_agreement: Optional[float] = typer.Option(None, help="Drop samples where fewer of the prompt's classes were found."),
    max_ignore: Optional[float] = typer.Option(None, help="Drop samples with a larger fraction of ignore (255) pixels."),
    min_pixel_confidence: Optional[float] = typer.Option(
        None, min=0.0, max=1.0,
        help="Semantic decoders: pixels whose winning class holds a smaller share of the class scores are ignore (255)."),
    min_instance_score: Optional[float] = typer.Option(
        None, min=0.0, max=1.0, help="Instance and pose decoders: keep instances scoring at least this (default 0.5)."),
    device: str = typer.Option("auto", help=f"Backbone and decoders: {DEVICE_HELP}."),
    dtype: Optional[str] = typer.Option(None, help=f"Backbone and decoder precision: {DTYPE_HELP}."),
    class_quota: Optional[int] = typer.Option(
        None, min=1, help="Plan the prompts so every class (--classes, default all) is named by at least this many "
        "samples (long-tail data; the plan's class counts go into run.json)."),
    workers: Optional[int] = typer.Option(
        None, min=1, help="Label on N Ray workers (a local Ray instance unless --ray-address); the dataset is the "
        "same for any N. Needs pip install 'datasetdm[ray]'."),
    ray_address: Optional[str] = typer.Option(
        None, help="Run the workers on this Ray cluster (paths must be visible on every node); without --workers, "
        "as many as its GPUs (or CPUs) hold."),
    gpus_per_worker: float = typer.Option(0.0, min=0.0, help="GPUs each Ray worker takes (0.5: two share one)."),
) -> None:
    """Generate annotated images: every decoder labels each image from the same hypercolumns
    (or, with --labeler attention, the model's own attention labels them)."""
    from datasetdm.formats.sample import Category
    from datasetdm.generation import Filters
    from datasetdm.generation.setup import generate_labelled

    scaleout = None
    if workers is not None or ray_address is not None:
        from datasetdm.generation.scaleout import ScaleOut, require_ray

        require_ray()  # before anything loads: a missing extra is a one-line error
        scaleout = ScaleOut(workers=workers, address=ray_address, gpus_per_worker=gpus_per_worker)
    elif gpus_per_worker:
        raise DatasetdmError("--gpus-per-worker is for Ray workers; add --workers N or --ray-address ADDR")
    categories, attention = [], None
    if labeler == "attention":
        from datasetdm.labelers.attention import AttentionLabelerConfig

        if classes:
            categories = [Category(i + 1, c.strip()) for i, c in enumerate(classes.split(",")) if c.strip()]
        try:
            attention = AttentionLabelerConfig(tau=tau, label_threshold=label_threshold, ignore_threshold=ignore_threshold)
        except ValueError as e:
            raise DatasetdmError(f"--tau/--label-threshold/--ignore-threshold: {e}") from None
    summary = generate_labelled(
        out, labeler=labeler, backbone=backbone, n=n, seed=seed, steps=steps, guidance=guidance,
        batch_size=batch_size, prompts=prompts,
        classes=[c.strip() for c in classes.split(",")] if classes and labeler == "decoder" else None,
        decoders=decoder, categories=categories, attention=attention, min_pixel_confidence=min_pixel_confidence,
        min_instance_score=min_instance_score,
        filters=Filters(min_confidence, min_area, min_agreement, max_ignore), samples_per_shard=samples_per_shard,
        resume=resume, device=device, dtype=dtype, class_quota=class_quota, scaleout=scaleout,
    )
    typer.echo(
        f"{out}: {summary.kept} kept, {summary.dropped} dropped {json.dumps(summary.drop_reasons)}; "
        f"{summary.generated} generated now at {summary.samples_per_second:.2f} samples/s"
    )


def export(
    shards: Path = typer.Argument(..., help="Shard folder written by `datasetdm generate`, or a labelled folder."),
    out: Path = typer.Option(..., help="Output folder."),
    format: str = typer.Option("folder", "--format", help="folder (labelled folder), voc, coco, cityscapes or hf "
                               "(Hugging Face Parquet)."),
    split: str = typer.Option("train", "--split", help="Split name the voc/coco/cityscapes/hf files are written as."),
    annotator: Optional[str] = typer.Option(None, help="Export a second annotator's labels instead of the primary ones."),
    limit: Optional[int] = typer.Option(None, min=0, help="Export at most this many samples."),
    overwrite: bool = typer.Option(False, help="Replace an existing export in OUT."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Export shards (or a labelled folder) as a labelled folder or a standard layout: VOC palette
    PNGs + lists, COCO JSON, Cityscapes ids, or a Hugging Face Parquet folder."""
    from datasetdm.formats.layouts.cli import export_layout

    export_layout(shards, out, format, split, annotator, limit, overwrite, progress)


def view(
    path: Path = typer.Argument(..., help="A labelled folder or a shard folder."),
    out: Optional[Path] = typer.Option(None, help="Gallery folder (default: PATH/gallery)."),
    limit: int = typer.Option(100, min=1, help="Show at most this many samples."),
) -> None:
    """Write a static HTML gallery: images, prompts and overlays (masks, contours, depth, skeletons)."""
    from datasetdm.view import build_gallery, gallery_summary

    index = build_gallery(path, out, limit=limit)
    typer.echo(f"{index} ({gallery_summary(index)['samples']} samples)")


def prompts(
    out: Path = typer.Option(..., help="Prompt file to write (reused if it exists, unless --refresh)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated classes: ~N prompts each. Omit for class-agnostic tasks."),
    n: int = typer.Option(100, min=1, help="Prompts per class (or in all, without --classes)."),
    min_words: int = typer.Option(10, min=1, help="Minimum words per description."),
    topic: str = typer.Option("people in everyday scenes", help="Subject for class-agnostic prompts (pose, depth)."),
    llm_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL or OpenAI)."),
    llm_model: Optional[str] = typer.Option(None, help="Model name (default: $OPENAI_MODEL)."),
    llm_key: Optional[str] = typer.Option(None, help="API key (default: $OPENAI_API_KEY)."),
    refresh: bool = typer.Option(False, help="Ask the model again even if OUT exists."),
) -> None:
    """Build a prompt file with a language model (asked as DatasetDM's supplementary §4 describes)."""
    from datasetdm.prompts.llm import ChatClient, build_prompt_file

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    client = None if (out.exists() and not refresh) else ChatClient(llm_url, llm_model, llm_key)
    result = build_prompt_file(out, names, n=n, client=client, min_words=min_words, topic=topic, refresh=refresh)
    typer.echo(f"{out}: {len(result)} prompts")
