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
from datasetdm.generation.setup import decoder_categories, file_digest, generate_with_decoders

__all__ = [
    "Annotator",
    "Filters",
    "GenerateFn",
    "GenerationSummary",
    "as_uint8_images",
    "decoder_categories",
    "file_digest",
    "generate_dataset",
    "generate_with_decoders",
    "merge_labels",
    "prompts_fingerprint",
    "quality_scores",
]
