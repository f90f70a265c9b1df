"""Tiny random backbones for tests and benchmarks (never imported by product code)."""

from datasetdm.testing.backbones import (
    make_sd15_shaped_backbone,
    make_tiny_backbone,
    sd15_shaped_components,
    write_clip_tokenizer_files,
)

__all__ = ["make_sd15_shaped_backbone", "make_tiny_backbone", "sd15_shaped_components", "write_clip_tokenizer_files"]
