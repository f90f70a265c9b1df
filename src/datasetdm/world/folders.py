"""World scenes as files: a labelled folder (the "real" labelled data) and a prompt file of
world-style captions (what an LLM prompt file would hold)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

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


def write_scenes_folder(out: Path, scenes: Sequence) -> Path:
    """``scenes`` as a labelled folder at ``out``; skipped when ``out`` already holds exactly them."""
    out = Path(out)
    if (out / "annotations.json").exists() and read_labelled_folder(out).ids == [s.id for s in scenes]:
        return out
    with LabelledFolderWriter(out, list(CATEGORIES), overwrite=True) as writer:
        for scene in scenes:
            writer.add(scene)
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


def long_tail_scenes(split: str, seed: int, tail: Sequence[str], head_images: int = 20, tail_images: int = 2,
                     preset: str = "default", max_scenes: int = 100_000) -> list:
    """The scenes (``LabelledSample``s) of a long-tail few-shot set (paper §4 and Table 7: head classes in 20 images
    each, tail classes in 2): scenes of (split, seed) in index order, a scene taken only while every
    class it shows is below its cap (``tail_images`` for the ``tail`` classes, ``head_images`` for
    the others), until every class has reached its cap. So each class shows in exactly its cap of
    images; empty scenes are skipped. Deterministic in (split, seed, tail, caps, preset)."""
    from datasetdm.errors import DatasetdmError

    names = [c.name for c in CATEGORIES]
    unknown = [t for t in tail if t not in names]
    if unknown:
        raise DatasetdmError(f"--tail {','.join(unknown)}: not a world class ({', '.join(names)})")
    if not tail:
        raise DatasetdmError("--tail: name at least one tail class")
    if head_images < 1 or tail_images < 1:
        raise DatasetdmError(f"--head-images {head_images} / --tail-images {tail_images}: must be at least 1")
    by_id = {c.id: c.name for c in CATEGORIES}
    caps = {n: (tail_images if n in tail else head_images) for n in names}
    counts = dict.fromkeys(names, 0)
    chosen = []
    for index in range(max_scenes):
        scene = render_scene(split, seed, index, preset)
        shown = {by_id[int(v)] for v in np.unique(scene.semantic) if int(v) in by_id}
        if not shown or any(counts[n] >= caps[n] for n in shown):
            continue
        chosen.append(scene)
        for n in shown:
            counts[n] += 1
        if counts == caps:
            return chosen
    short = {n: counts[n] for n in names if counts[n] < caps[n]}
    raise DatasetdmError(f"long-tail set: after {max_scenes} {split} scenes, classes below their cap: {short}")


def render_long_tail_folder(out: Path, split: str, seed: int, tail: Sequence[str], head_images: int = 20,
                            tail_images: int = 2, preset: str = "default") -> Path:
    """The scenes of ``long_tail_scenes`` as a labelled folder; skipped when ``out`` holds them."""
    return write_scenes_folder(out, long_tail_scenes(split, seed, tail, head_images, tail_images, preset))


def class_image_counts(samples) -> dict[str, int]:
    """Images showing each world class (semantic masks), in category order."""
    by_id = {c.id: c.name for c in CATEGORIES}
    counts = dict.fromkeys(by_id.values(), 0)
    for s in samples:
        for v in np.unique(s.semantic):
            if int(v) in by_id:
                counts[by_id[int(v)]] += 1
    return counts


def parse_domain(text: str) -> tuple[str | None, str | None]:
    """"grass:sunny", "grass" or "night" -> (setting, lighting): each part a world setting or
    lighting name."""
    from datasetdm.errors import DatasetdmError
    from datasetdm.world.render import LIGHTING, SETTINGS

    setting = lighting = None
    parts = [p.strip() for p in text.split(":") if p.strip()]
    for part in parts:
        if part in SETTINGS and setting is None:
            setting = part
        elif part in LIGHTING and lighting is None:
            lighting = part
        else:
            raise DatasetdmError(f"--domain {text!r}: {part!r} is not a setting ({', '.join(SETTINGS)}) or a "
                                 f"lighting ({', '.join(LIGHTING)}), or is given twice")
    if not parts:
        raise DatasetdmError(f"--domain {text!r}: name a setting and/or a lighting, e.g. grass:sunny")
    return setting, lighting


def domain_scenes(split: str, seed: int, n: int, setting: str | None = None, lighting: str | None = None,
                  inside: bool = True, preset: str = "default", max_scenes: int = 100_000) -> list:
    """The first ``n`` scenes of (split, seed) in the domain (the given setting and lighting), or with
    ``inside=False`` outside it (any other setting or lighting): domain generalisation's source
    and target data (DatasetDM supplementary, Table 9)."""
    from datasetdm.errors import DatasetdmError

    chosen = []
    for index in range(max_scenes):
        scene = render_scene(split, seed, index, preset)
        match = (setting is None or scene.meta["setting"] == setting) and \
                (lighting is None or scene.meta["lighting"] == lighting)
        if match == inside:
            chosen.append(scene)
            if len(chosen) == n:
                return chosen
    raise DatasetdmError(f"domain {setting}:{lighting}: only {len(chosen)} of {n} {split} scenes in {max_scenes}")


def render_domain_folder(out: Path, split: str, seed: int, n: int, setting: str | None, lighting: str | None,
                         preset: str = "default") -> Path:
    """``domain_scenes`` (inside) as a labelled folder; skipped when ``out`` holds them."""
    return write_scenes_folder(out, domain_scenes(split, seed, n, setting, lighting, True, preset))


def seen_only(sample, unseen_ids: set[int]):
    """A copy of ``sample`` with the unseen classes' labels removed: their pixels ignore (255),
    their instances dropped (zero-shot's labelled data, paper §4 and Table 7)."""
    from dataclasses import replace

    semantic = np.asarray(sample.semantic).copy()
    semantic[np.isin(semantic, sorted(unseen_ids))] = 255
    instances = [i for i in (sample.instances or []) if i.category_id not in unseen_ids]
    return replace(sample, semantic=semantic, instances=instances)


def render_seen_only_folder(out: Path, split: str, seed: int, n: int, unseen: Sequence[str],
                            preset: str = "default") -> Path:
    """Scenes 0..n-1 of (split, seed) with the ``unseen`` classes' labels removed (``seen_only``);
    skipped when ``out`` holds them."""
    from datasetdm.errors import DatasetdmError

    names = {c.name: c.id for c in CATEGORIES}
    unknown = [u for u in unseen if u not in names]
    if unknown or not unseen:
        raise DatasetdmError(f"--zero-shot {','.join(unseen)}: name world classes ({', '.join(names)})")
    out = Path(out)
    if (out / "annotations.json").exists() and len(read_labelled_folder(out)) == n:
        return out
    ids = {names[u] for u in unseen}
    with LabelledFolderWriter(out, list(CATEGORIES), overwrite=True) as writer:
        for index in range(n):
            writer.add(seen_only(render_scene(split, seed, index, preset), ids))
    return out
