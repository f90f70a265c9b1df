"""Layer 5: the text-to-data loop (paper §3.5): prompts in, annotated shards out — scores,
filters, resume (``loop``) and the set-up every generating command shares (``setup``)."""

from datasetdm.generation.loop import (
    Annotator,
    Filters,
    GenerateFn,
    GenerationSummary,
    as_uint8_images,
    generate_dataset,
    merge_labels,
    prompts_fingerprint,
    quality_scores,
)
from datasetdm.generation.setup import generate_labelled

__all__ = [
    "Annotator",
    "Filters",
    "GenerateFn",
    "GenerationSummary",
    "as_uint8_images",
    "generate_dataset",
    "generate_labelled",
    "merge_labels",
    "prompts_fingerprint",
    "quality_scores",
]
