"""World scenes as files: a labelled folder (the "real" labelled data) and a prompt file of
world-style captions (what an LLM prompt file would hold)."""

from __future__ import annotations

from pathlib import Path

from datasetdm.formats.labelled_folder import LabelledFolderWriter, read_labelled_folder
from datasetdm.io import atomic_path
from datasetdm.world.render import CATEGORIES, render_scene


def render_world_folder(out: Path, split: str, seed: int, n: int, preset: str = "default") -> Path:
    """Scenes 0..n-1 of (split, seed) as a labelled folder; skipped when ``out`` already holds them."""
    out = Path(out)
    if (out / "annotations.json").exists() and len(read_labelled_folder(out)) == n:
        return out
    with LabelledFolderWriter(out, list(CATEGORIES), overwrite=True) as writer:
        for index in range(n):
            writer.add(render_scene(split, seed, index, preset))
    return out


def world_prompt_file(path: Path, n: int, seed: int = 0, preset: str = "default") -> Path:
    """Captions of ``n`` val-split scenes, one a line (only the text is used, never the labels);
    skipped when ``path`` exists."""
    path = Path(path)
    if path.exists():
        return path
    lines = [render_scene("val", seed, i, preset).caption for i in range(n)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
