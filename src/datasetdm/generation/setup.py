"""What every command that generates sets up the same way (`generate`, `demo`, `downstream`):
the backbone, a labeler from the registry, prompts, and the loop call."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from datasetdm.formats.sample import Category
from datasetdm.generation.loop import Filters, GenerationSummary, generate_dataset


def generate_labelled(out: Path, *, labeler: str = "decoder", backbone: str | None, n: int, seed: int,
                      steps: int, guidance: float, batch_size: int, prompts: Path | None = None,
                      classes: Sequence[str] | None = None, decoders: Sequence[Path] = (),
                      categories: Sequence[Category] = (), attention=None, min_pixel_confidence: float | None = None,
                      min_instance_score: float | None = None,
                      filters: Filters | None = None, samples_per_shard: int = 1000, resume: bool | None = None,
                      device: str = "cpu", show_progress: bool = True,
                      class_quota: int | None = None) -> GenerationSummary:
    """Generate ``n`` labelled samples into ``out``. Prompts come from the file or folder
    ``prompts``, else from templates over ``classes`` (default: every labelled class).
    ``resume=None`` resumes when ``out`` holds an interrupted run. ``class_quota``: prompts
    planned so that every class (``classes``, default every labelled class) is named by at least
    that many samples (``prompts.quota.QuotaPrompts``); the plan's class counts go into run.json
    (``config.class_quota``) and the manifest's metadata."""
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.errors import DatasetdmError
    from datasetdm.labelers.registry import check_labeler_args, create_labeler
    from datasetdm.prompts import TemplatePrompts, load_prompts

    check_labeler_args(labeler, decoders, categories, min_pixel_confidence)
    bb = load_backbone(backbone, device=device)
    labeling = create_labeler(labeler, bb, steps=steps, guidance=guidance, decoders=decoders, categories=categories,
                              attention=attention, min_pixel_confidence=min_pixel_confidence,
                              min_instance_score=min_instance_score)
    names = [c.name for c in labeling.categories]
    if prompts is not None:
        source = load_prompts(prompts, classes=names, seed=seed)
    else:
        chosen = list(classes) if classes else names
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise DatasetdmError(f"--classes: {', '.join(unknown)} not among the labelled classes ({', '.join(names)})")
        source = TemplatePrompts(chosen, seed=seed)
    config = labeling.config
    if class_quota is not None:
        from datasetdm.prompts.quota import QuotaPrompts

        quota_classes = list(classes) if classes else names
        pool = source.prompts if hasattr(source, "prompts") else [source.prompt(i) for i in range(max(n, len(names)))]
        source = QuotaPrompts(source, pool, quota_classes, n, class_quota, seed=seed,
                              where=str(prompts) if prompts is not None else "template prompts")
        config = {**config, "class_quota": source.record()}
    return generate_dataset(
        out, labeling.generate_fn, labeling.annotators, source, labeling.categories, n=n, seed=seed,
        batch_size=batch_size, samples_per_shard=samples_per_shard, filters=filters or Filters(),
        backbone=f"{bb.name}@{bb.fingerprint}", config=config,
        resume=(Path(out) / "run.json").exists() if resume is None else resume, progress=show_progress,
        read_prompt=labeling.read_prompt,
    )
