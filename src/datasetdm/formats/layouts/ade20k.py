"""ADE20K in the SceneParsing layout (ADEChallengeData2016, the MIT Scene Parsing benchmark).

The layout as ADEChallengeData2016.zip ships it::

    images/{training,validation}/ADE_{train,val}_{n:08d}.jpg
    annotations/{training,validation}/ADE_{train,val}_{n:08d}.png   8-bit: 0 "other", 1-150 classes
    objectInfo150.csv          (optional, from the devkit) Idx,Ratio,Train,Val,Name
    sceneCategories.txt        (optional) "{image stem} {scene}" per line

Convention: 0 ("other objects", not scored by the benchmark) becomes ignore (255); classes 1-150
keep their ids as our category ids. (Benchmark code shifts them to 0-149 with
``reduce_zero_label``; this folder needs no shift because its 0 is background, which ADE20K does
not have.) Class names come from objectInfo150.csv when ``SRC`` (or its parent) has it, else
from the built-in list below: the first name of each of the 150 classes. ``--split`` takes
train/val (or training/validation).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.layouts.common import ScannedDataset, SourceItem, check_label_ids, check_size, read_index_png
from datasetdm.formats.png import read_rgb
from datasetdm.formats.sample import IGNORE_INDEX, Category, LabelledSample

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
NUM_CLASSES = 150
SPLIT_FOLDERS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_object_info(path: Path) -> list[Category]:
    """objectInfo150.csv -> categories; a name like "building;edifice" gives its first part."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        names = {int(row["Idx"]): row["Name"].split(";")[0].strip() for row in rows}
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise DatasetdmError(f"{path}: not an ADE20K objectInfo150.csv (columns Idx,...,Name) ({e})") from None
    if sorted(names) != list(range(1, NUM_CLASSES + 1)):
        raise DatasetdmError(f"{path}: expected class indices 1..{NUM_CLASSES}")
    return [Category(i, names[i]) for i in range(1, NUM_CLASSES + 1)]


def _scenes(path: Path) -> dict[str, str]:
    scenes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            scenes[parts[0]] = parts[1]
    return scenes


def scan_ade20k(src: str | Path, split: str = "train") -> ScannedDataset:
    root = Path(src)
    if split not in SPLIT_FOLDERS:
        raise DatasetdmError(f"--split {split}: ADE20K has train (training) and val (validation)")
    folder = SPLIT_FOLDERS[split]
    image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
    for path in (image_dir, label_dir):
        if not path.is_dir():
            raise DatasetdmError(f"{path}: missing (ADE20K SceneParsing layout: images/{folder}, annotations/{folder})")
    info = next((p for p in (root / "objectInfo150.csv", root.parent / "objectInfo150.csv") if p.is_file()), None)
    categories = read_object_info(info) if info else [Category(i + 1, n) for i, n in enumerate(ADE20K_CLASSES)]
    scene_file = root / "sceneCategories.txt"
    scenes = _scenes(scene_file) if scene_file.is_file() else {}
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in sorted(label_dir.glob("*.png"))}
    if not images:
        raise DatasetdmError(f"{image_dir}: no images")
    items = []
    for sid, label_path in labels.items():
        if sid not in images:
            raise DatasetdmError(f"{label_path}: mask without an image (no {image_dir / (sid + '.jpg')})")
    for sid, image_path in images.items():
        label_path = labels.get(sid)
        if label_path is None:
            raise DatasetdmError(f"{image_path}: no annotation ({label_dir / (sid + '.png')} is missing)")
        items.append(SourceItem(sid, functools.partial(_load, sid, image_path, label_path, scenes.get(sid)),
                                functools.partial(_class_ids, label_path)))
    return ScannedDataset("ade20k", root, categories, items, [])


def _semantic(label_path: Path) -> np.ndarray:
    labels = read_index_png(label_path, "an ADE20K annotation")
    check_label_ids(label_path, labels, set(range(NUM_CLASSES + 1)), "ADE20K annotations hold 0 (other) and 1-150")
    semantic = labels.copy()
    semantic[labels == 0] = IGNORE_INDEX
    return semantic


def _class_ids(label_path: Path) -> frozenset[int]:
    return frozenset(int(v) for v in np.unique(_semantic(label_path)) if v != IGNORE_INDEX)


def _load(sid: str, image_path: Path, label_path: Path, scene: str | None) -> LabelledSample:
    image = read_rgb(image_path)
    semantic = _semantic(label_path)
    check_size(label_path, semantic, image_path, image)
    return LabelledSample(id=sid, image=image, semantic=semantic, meta={"scene": scene} if scene else {})
