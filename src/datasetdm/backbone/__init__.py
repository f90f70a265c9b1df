"""Stage 1: load a diffusion model and capture its hypercolumns (paper §3.3)."""

from datasetdm.backbone.capture import capture_hypercolumns, capture_real, generate, preprocess_images
from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.backbone.loader import Backbone, PromptEmbeddings, embedded_backbone_path, load_backbone
from datasetdm.backbone.tokens import average_token_maps, token_positions

__all__ = [
    "Backbone",
    "Hypercolumns",
    "PromptEmbeddings",
    "average_token_maps",
    "capture_hypercolumns",
    "capture_real",
    "embedded_backbone_path",
    "generate",
    "load_backbone",
    "preprocess_images",
    "token_positions",
]
