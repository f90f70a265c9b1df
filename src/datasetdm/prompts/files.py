"""Prompt files: the cache that makes generation independent of any language model.

Two layouts:

* a text file, one prompt a line. A line may start with the class names it shows, comma
  separated, then a tab: ``dog,cat<TAB>a dog chasing a cat across a lawn``. Without that prefix
  the classes are the given class names found in the text as words.
* a folder with one ``{class}.txt`` per class (``traffic_light.txt`` is "traffic light"), one
  prompt a line; each prompt shows that class.

Blank lines and lines starting with ``#`` are skipped in both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from datasetdm.errors import DatasetdmError
from datasetdm.io import atomic_path
from datasetdm.prompts.base import Prompt, PromptList, classes_in_text


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
