"""Tiny random backbones for tests and benchmarks (never imported by product code)."""

from datasetdm.testing.backbones import (
    FAMILIES,
    SHAPED_FAMILIES,
    family_shaped_components,
    make_sd15_shaped_backbone,
    make_tiny_backbone,
    make_tiny_family,
    sd15_shaped_components,
    write_clip_tokenizer_files,
    write_family_shaped_backbone,
)

__all__ = [
    "FAMILIES",
    "SHAPED_FAMILIES",
    "family_shaped_components",
    "make_sd15_shaped_backbone",
    "make_tiny_backbone",
    "make_tiny_family",
    "sd15_shaped_components",
    "write_clip_tokenizer_files",
    "write_family_shaped_backbone",
]
