"""What every command that generates sets up the same way (`generate`, `demo`, `downstream`):
the backbone, a labeler from the registry, prompts, and the loop call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from datasetdm.formats.sample import Category
from datasetdm.generation.loop import Filters, GenerationSummary, generate_dataset


@dataclass(frozen=True)
class LabelerSpec:
    """Everything that builds a run's backbone and labeler (``build_labeling``): plain values, so
    a scale-out worker builds the same labeler from it as the process that started the run."""

    labeler: str = "decoder"
    backbone: str | None = None
    steps: int = 25
    guidance: float = 4.0
    decoders: tuple[Path, ...] = ()
    categories: tuple[Category, ...] = ()
    attention: object = None  # AttentionLabelerConfig or None
    min_pixel_confidence: float | None = None
    min_instance_score: float | None = None
    device: str = "cpu"
    dtype: str | None = None
    capture_step: int = -1  # the denoising step the decoders read (create_labeler)


def build_labeling(spec: LabelerSpec):
    """(backbone, ``labelers.registry.Labeling``) for ``spec``; a reduced precision goes into the
    labeling's config (a resume cannot mix fp16 and fp32 samples)."""
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.labelers.registry import create_labeler

    bb = load_backbone(spec.backbone, device=spec.device, dtype=spec.dtype)
    labeling = create_labeler(spec.labeler, bb, steps=spec.steps, guidance=spec.guidance, decoders=spec.decoders,
                              categories=spec.categories, attention=spec.attention,
                              min_pixel_confidence=spec.min_pixel_confidence,
                              min_instance_score=spec.min_instance_score, capture_step=spec.capture_step)
    import torch

    if bb.dtype != torch.float32:  # fp32 runs keep the settings they had, so they still resume
        from datasetdm.backbone.device import dtype_name

        labeling.config["dtype"] = dtype_name(bb.dtype)
    return bb, labeling


def prompt_source(prompts, classes, names: list[str], n: int, seed: int, class_quota: int | None = None):
    """The prompts a run of ``n`` samples reads: the file or folder ``prompts``, else templates over
    ``classes`` (default ``names``, the labelled classes); with ``class_quota``, planned so every class
    is named by that many samples (``prompts.quota.QuotaPrompts``, which refuses a quota ``n`` cannot
    meet). Cheap: callers can check a plan before any model loads."""
    from datasetdm.errors import DatasetdmError
    from datasetdm.prompts import TemplatePrompts, load_prompts

    if prompts is not None:
        source = load_prompts(prompts, classes=names, seed=seed)
    else:
        chosen = list(classes) if classes else names
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise DatasetdmError(f"--classes: {', '.join(unknown)} not among the labelled classes ({', '.join(names)})")
        source = TemplatePrompts(chosen, seed=seed)
    if class_quota is None:
        return source
    from datasetdm.prompts.quota import QuotaPrompts

    pool = source.prompts if hasattr(source, "prompts") else [source.prompt(i) for i in range(max(n, len(names)))]
    return QuotaPrompts(source, pool, list(classes) if classes else names, n, class_quota, seed=seed,
                        where=str(prompts) if prompts is not None else "template prompts")


def generate_labelled(out: Path, *, labeler: str = "decoder", backbone: str | None, n: int, seed: int,
                      steps: int, guidance: float, batch_size: int, prompts: Path | None = None,
                      classes: Sequence[str] | None = None, decoders: Sequence[Path] = (),
                      categories: Sequence[Category] = (), attention=None, min_pixel_confidence: float | None = None,
                      min_instance_score: float | None = None,
                      filters: Filters | None = None, samples_per_shard: int = 1000, resume: bool | None = None,
                      device: str = "cpu", dtype: str | None = None, show_progress: bool = True,
                      class_quota: int | None = None, scaleout=None, capture_step: int = -1) -> GenerationSummary:
    """Generate ``n`` labelled samples into ``out``. Prompts come from the file or folder
    ``prompts``, else from templates over ``classes`` (default: every labelled class).
    ``resume=None`` resumes when ``out`` holds an interrupted run. ``device``/``dtype``: see
    ``backbone.device.placement`` (auto: CUDA in fp16 when present); a reduced precision is part
    of the run's settings, so a resume cannot mix fp16 and fp32 samples. ``class_quota``: prompts
    planned so that every class (``classes``, default every labelled class) is named by at least
    that many samples (``prompts.quota.QuotaPrompts``); the plan's class counts go into run.json
    (``config.class_quota``) and the manifest's metadata. ``scaleout``: a
    ``generation.scaleout.ScaleOut`` to label on Ray workers (same samples, byte for byte).
    ``capture_step``: the denoising step whose features the decoders read (default the last);
    recorded in run.json when not the default."""
    from datasetdm.labelers.registry import check_labeler_args

    check_labeler_args(labeler, decoders, categories, min_pixel_confidence)
    spec = LabelerSpec(labeler, backbone, steps, guidance, tuple(Path(d) for d in decoders), tuple(categories),
                       attention, min_pixel_confidence, min_instance_score, device, dtype, capture_step)
    executor = None
    if scaleout is not None:
        from datasetdm.generation.scaleout import ray_executor

        executor = ray_executor(scaleout, spec)  # checks Ray is installed before any model loads
        spec = replace(spec, device="cpu", dtype=scaleout.worker_dtype(dtype))  # this process only describes the run
    bb, labeling = build_labeling(spec)
    source = prompt_source(prompts, classes, [c.name for c in labeling.categories], n, seed, class_quota)
    config = labeling.config
    if class_quota is not None:
        config = {**config, "class_quota": source.record()}
    return generate_dataset(
        out, labeling.generate_fn, labeling.annotators, source, labeling.categories, n=n, seed=seed,
        batch_size=batch_size, samples_per_shard=samples_per_shard, filters=filters or Filters(),
        backbone=f"{bb.name}@{bb.fingerprint}", config=config,
        resume=(Path(out) / "run.json").exists() if resume is None else resume, progress=show_progress,
        read_prompt=labeling.read_prompt, executor=executor,
    )
