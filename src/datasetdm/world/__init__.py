"""The embedded world: a procedural renderer with exact ground truth for every task."""

from datasetdm.world.render import CATEGORIES, IMAGE_SIZE, render_scene

__all__ = ["CATEGORIES", "IMAGE_SIZE", "render_scene"]
