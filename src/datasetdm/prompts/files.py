"""Prompt files: the cache that makes generation independent of any language model.

Three layouts:

* a text file, one prompt a line. A line may start with the class names it shows, comma
  separated, then a tab: ``dog,cat<TAB>a dog chasing a cat across a lawn``. Without that prefix
  the classes are the given class names found in the text as words.
* a folder with one ``{class}.txt`` per class (``traffic_light.txt`` is "traffic light"), one
  prompt a line; each prompt shows that class.

* a labelled folder (``annotations.json`` with captions, e.g. an imported COCO set): each
  captioned image gives one prompt, its caption with the class names it shows appended as
  Dataset Diffusion generates its VOC and COCO sets ("class-prompt appending": "a man on a
  horse; person horse"). Its classes are those of its instances, or of its semantic mask when
  it has no instances, in category-id order; given the run's ``classes``, only those are kept.

Blank lines and lines starting with ``#`` are skipped in the text layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from datasetdm.errors import DatasetdmError
from datasetdm.io import atomic_path
from datasetdm.prompts.base import Prompt, PromptList, append_class_names, classes_in_text


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetdmError(f"{path}: prompt file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetdmError(f"{path}: prompt file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append((number, line))
    return out


def _check_known(path: Path, number: int, found: Sequence[str], classes: Sequence[str] | None) -> None:
    if classes is None:
        return
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DatasetdmError(f"{path}:{number}: unknown class {unknown[0]!r}; known classes: {', '.join(classes)}")


def _parse_file(path: Path, classes: Sequence[str] | None, file_class: str | None = None) -> list[Prompt]:
    prompts = []
    for number, line in _lines(path):
        if "\t" in line:
            prefix, _, text = line.partition("\t")
            found = tuple(c.strip() for c in prefix.split(",") if c.strip())
            _check_known(path, number, found, classes)
        else:
            text = line
            found = classes_in_text(text, classes) if classes else ()
        text = " ".join(text.split())
        if not text:
            raise DatasetdmError(f"{path}:{number}: empty prompt after the class prefix")
        if file_class is not None:
            found = (file_class,) + tuple(c for c in found if c != file_class)
        prompts.append(Prompt(text, found))
    return prompts


def read_prompts(path: str | os.PathLike, classes: Sequence[str] | None = None) -> list[Prompt]:
    """Read a prompt file or a folder of per-class prompt files (see the module doc)."""
    path = Path(path)
    if path.is_dir() and (path / "annotations.json").is_file():
        return _caption_prompts(path, classes)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DatasetdmError(f"{path}: prompt folder has no .txt files (expected one per class)")
        prompts = []
        for file in files:
            name = file.stem.replace("_", " ")
            _check_known(file, 0, [name], classes)
            prompts += _parse_file(file, classes, file_class=name)
    else:
        prompts = _parse_file(path, classes)
    if not prompts:
        raise DatasetdmError(f"{path}: no prompts found")
    return prompts


def _caption_prompts(folder: Path, classes: Sequence[str] | None) -> list[Prompt]:
    """Prompts from a labelled folder's captions (see the module doc)."""
    import json

    import numpy as np

    from datasetdm.formats.png import read_semantic_png

    ann_path = folder / "annotations.json"
    try:
        data = json.loads(ann_path.read_text(encoding="utf-8"))
        names = {int(c["id"]): str(c["name"]) for c in data.get("categories") or []}
        images = list(data["images"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetdmError(f"{ann_path}: not a labelled folder's annotations.json ({e})") from None
    shown: dict = {}
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict) and not ann.get("iscrowd"):
            shown.setdefault(ann.get("image_id"), set()).add(ann.get("category_id"))
    use_semantic = not data.get("annotations") and (folder / "semantic").is_dir()
    wanted = set(classes) if classes is not None else None
    if wanted is not None and not wanted & set(names.values()):
        raise DatasetdmError(f"{folder}: none of its classes ({', '.join(names.values()) or 'none'}) is among "
                             f"the run's classes ({', '.join(classes)})")
    prompts = []
    for image in images:
        caption = image.get("caption") if isinstance(image, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            continue
        if use_semantic:
            stem = Path(str(image.get("file_name", ""))).stem
            ids = set(np.unique(read_semantic_png(folder / "semantic" / f"{stem}.png")).tolist())
        else:
            ids = shown.get(image.get("id"), set())
        found = tuple(names[i] for i in sorted(ids) if i in names and (wanted is None or names[i] in wanted))
        prompts.append(Prompt(append_class_names(" ".join(caption.split()), found), found))
    if not prompts:
        raise DatasetdmError(f"{ann_path}: no image has a caption; a labelled folder gives prompts from its captions")
    return prompts


def load_prompts(path: str | os.PathLike, classes: Sequence[str] | None = None, seed: int = 0) -> PromptList:
    return PromptList(read_prompts(path, classes), seed=seed)


def write_prompts(path: str | os.PathLike, prompts: Sequence[Prompt]) -> None:
    """Write prompts as one text file (class prefix when a prompt has classes), atomically."""
    lines = []
    for p in prompts:
        text = " ".join(p.text.split())
        lines.append(f"{','.join(p.classes)}\t{text}" if p.classes else text)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
