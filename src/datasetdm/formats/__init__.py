"""Readers and writers of every dataset format the project speaks."""

from datasetdm.formats.labelled_folder import LabelledFolder, LabelledFolderWriter, read_labelled_folder
from datasetdm.formats.sample import (
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    IGNORE_INDEX,
    Category,
    Instance,
    LabelledSample,
)

__all__ = [
    "COCO_KEYPOINT_NAMES",
    "COCO_SKELETON",
    "IGNORE_INDEX",
    "Category",
    "Instance",
    "LabelledFolder",
    "LabelledFolderWriter",
    "LabelledSample",
    "read_labelled_folder",
]
