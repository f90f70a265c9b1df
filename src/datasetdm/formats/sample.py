"""The in-memory sample every stage exchanges: the world renders it, the labelled folder stores
it, the decoders and labelers predict it, generation shards it, export writes it back out.

Arrays are numpy, in image pixel coordinates. Any label field may be None (a user's folder may
carry semantic masks only, or depth only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255
"""Semantic label value for 'uncertain, do not train or score' (VOC convention)."""

COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's person skeleton, 1-based keypoint indices as in the COCO annotation files.
COCO_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)


@dataclass(frozen=True)
class Category:
    """A labelled class. ``id`` is the value in semantic masks and COCO ``category_id`` (>= 1)."""

    id: int
    name: str
    keypoints: tuple[str, ...] | None = None  # COCO keypoint names, for "person"
    skeleton: tuple[tuple[int, int], ...] | None = None


@dataclass
class Instance:
    """One object: a binary mask, its class, and for people the 17 COCO keypoints.

    ``keypoints`` is (17, 3) float: x, y in pixels and COCO visibility v (0 not labelled or out of
    frame, 1 labelled but occluded, 2 visible).
    """

    category_id: int
    mask: np.ndarray  # (H, W) bool
    keypoints: np.ndarray | None = None
    score: float | None = None  # set by predictors; absent for ground truth


@dataclass
class LabelledSample:
    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str | None = None
    semantic: np.ndarray | None = None  # (H, W) uint8: 0 background, category ids, 255 ignore
    instances: list[Instance] | None = None
    depth: np.ndarray | None = None  # (H, W) float32 metres; 0 = no depth (e.g. sky)
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self.image.shape[0], self.image.shape[1]
