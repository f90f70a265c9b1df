"""A static HTML gallery of a dataset: each image with its prompt and overlays.

Works on a labelled folder or directly on a shard folder. Overlays are precomposed PNGs (Pillow)
linked from one ``index.html``, so the gallery opens from disk in any browser, with no server
and no script libraries: class-colour masks, instance contours, a depth colour map and
skeletons, each only where the sample has that label.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from datasetdm.errors import DatasetdmError
from datasetdm.formats.png import voc_palette
from datasetdm.formats.sample import IGNORE_INDEX, Category, LabelledSample

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
# Instance contour colours: distinct, bright, cycled (tab10-like).
_INSTANCE_COLOURS = np.array(
    [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
     (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 255, 255)],
    dtype=np.uint8,
)
# Depth colour map anchors, near (warm) to far (cool); 0 = no depth is drawn black.
_DEPTH_ANCHORS = np.array([(252, 253, 191), (252, 137, 97), (183, 55, 121), (81, 18, 124), (0, 0, 4)], dtype=np.float64)
MIN_DISPLAY_SIDE = 192  # small images (the embedded world's are 64 px) are enlarged to this


def class_colour(category_id: int) -> tuple[int, int, int]:
    """The colour of a class in masks and the legend (the VOC palette, as in the mask PNGs)."""
    return tuple(int(v) for v in _PALETTE[category_id % 256])


def _scale_for(height: int, width: int) -> int:
    return max(1, math.ceil(MIN_DISPLAY_SIDE / max(height, width)))


def _up(array: np.ndarray, s: int) -> np.ndarray:
    return array if s == 1 else np.repeat(np.repeat(array, s, axis=0), s, axis=1)


def mask_overlay(image: np.ndarray, semantic: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Class colours blended over the image; background shows through, ignore is hatched white."""
    out = image.astype(np.float64)
    colours = _PALETTE[semantic].astype(np.float64)
    labelled = (semantic != 0) & (semantic != IGNORE_INDEX)
    out[labelled] = (1 - alpha) * out[labelled] + alpha * colours[labelled]
    ignore = semantic == IGNORE_INDEX
    yy, xx = np.indices(semantic.shape)
    hatch = ignore & ((yy + xx) % 4 < 2)
    out[hatch] = 255
    return out.astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="constant")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def contour_overlay(image: np.ndarray, masks: Sequence[np.ndarray], scale: int) -> np.ndarray:
    """Instance outlines in distinct colours (one colour per instance), drawn at display size."""
    out = _up(image, scale).copy()
    for k, mask in enumerate(masks):
        m = _up(np.asarray(mask, bool), scale)
        edge = _boundary(m)
        if scale >= 4:  # a 1 px line is hard to see on enlarged images: thicken it inward
            edge |= _boundary(m & ~edge)
        out[edge] = _INSTANCE_COLOURS[k % len(_INSTANCE_COLOURS)]
    return out


def depth_colours(depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colour map of depth: near warm, far dark; 0 (no depth) black."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = depth > 0
    out = np.zeros(depth.shape + (3,), np.uint8)
    if not valid.any():
        return out
    lo, hi = np.percentile(depth[valid], [2, 98])
    t = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1) * (len(_DEPTH_ANCHORS) - 1)
    i = np.minimum(t.astype(int), len(_DEPTH_ANCHORS) - 2)
    f = (t - i)[..., None]
    colours = (1 - f) * _DEPTH_ANCHORS[i] + f * _DEPTH_ANCHORS[i + 1]
    out[valid] = colours[valid].astype(np.uint8)
    return out


def skeleton_overlay(image: np.ndarray, instances, categories: dict[int, Category], scale: int) -> np.ndarray | None:
    """Keypoints and limbs of every instance that has keypoints; None if none has."""
    people = [i for i in instances if i.keypoints is not None]
    if not people:
        return None
    canvas = Image.fromarray(_up(image, scale))
    draw = ImageDraw.Draw(canvas)
    radius = max(2, scale // 2 + 1)
    for k, inst in enumerate(people):
        kp = np.asarray(inst.keypoints, dtype=np.float64).reshape(-1, 3)
        colour = tuple(int(v) for v in _INSTANCE_COLOURS[k % len(_INSTANCE_COLOURS)])
        skeleton = categories.get(inst.category_id, Category(0, "")).skeleton or ()
        for a, b in skeleton:  # COCO skeletons are 1-based
            if a - 1 < len(kp) and b - 1 < len(kp) and kp[a - 1, 2] > 0 and kp[b - 1, 2] > 0:
                draw.line([tuple(kp[a - 1, :2] * scale), tuple(kp[b - 1, :2] * scale)], fill=colour, width=max(1, scale // 2))
        for x, y, v in kp:
            if v > 0:
                # visible joints filled, occluded (v=1) hollow
                box = [x * scale - radius, y * scale - radius, x * scale + radius, y * scale + radius]
                draw.ellipse(box, fill=colour if v >= 2 else None, outline=(255, 255, 255))
    return np.asarray(canvas)


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")


def sample_panels(sample: LabelledSample, categories: dict[int, Category], extras: dict | None = None) -> list[tuple[str, np.ndarray]]:
    """(title, RGB array at display size) for each overlay the sample's labels allow."""
    image = np.asarray(sample.image, dtype=np.uint8)
    s = _scale_for(*image.shape[:2])
    panels = [("image", _up(image, s))]
    if sample.semantic is not None:
        panels.append(("classes", _up(mask_overlay(image, np.asarray(sample.semantic)), s)))
    if sample.instances:
        panels.append(("instances", contour_overlay(image, [i.mask for i in sample.instances], s)))
        skeleton = skeleton_overlay(image, sample.instances, categories, s)
        if skeleton is not None:
            panels.append(("skeletons", skeleton))
    if sample.depth is not None:
        panels.append(("depth", _up(depth_colours(sample.depth), s)))
    for name, extra in (extras or {}).items():
        if extra.semantic is not None:
            panels.append((f"{name} classes", _up(mask_overlay(image, np.asarray(extra.semantic)), s)))
        if extra.depth is not None:
            panels.append((f"{name} depth", _up(depth_colours(extra.depth), s)))
    return panels


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.3em; }
.legend span { display: inline-block; margin: 0 .8em .4em 0; }
.legend i { display: inline-block; width: .9em; height: .9em; margin-right: .3em; vertical-align: -.1em; border: 1px solid #888; }
.sample { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .8em; margin: 0 0 1em; }
.sample p { margin: .2em 0 .6em; }
.meta { color: #666; font-size: .85em; }
figure { display: inline-block; margin: 0 .5em .3em 0; text-align: center; }
figure img { display: block; image-rendering: pixelated; max-width: 320px; }
figcaption { font-size: .8em; color: #555; }
"""

# Counts images that actually decoded, so a headless browser check can read it from the DOM.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) ok++; });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-loaded', ok);
});
"""


def _format_scores(meta: dict) -> str:
    scores = meta.get("scores") or {}
    parts = [f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, (int, float))]
    if "seed" in meta:
        parts.append(f"seed {meta['seed']}")
    return " · ".join(parts)


def write_gallery(
    samples: Iterable[LabelledSample | tuple[LabelledSample, dict]],
    categories: Sequence[Category],
    out_dir: str | os.PathLike,
    title: str = "datasetdm gallery",
    limit: int | None = None,
) -> Path:
    """Write ``out_dir/index.html`` and its overlay PNGs under ``out_dir/assets``; return the page.

    The pictures are drawn into a temporary folder that replaces ``assets`` only once every sample
    was read: a damaged input (a truncated shard) leaves the previous gallery, or none, never a
    page missing half its pictures; a new ``out_dir`` the failed run made is removed again."""
    out_dir = Path(out_dir)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".assets-", suffix=".tmp", dir=out_dir))
    os.chmod(building, 0o777 & ~_umask())
    try:
        index = _write_gallery(samples, categories, out_dir, building, title, limit)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if made:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return index


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_gallery(samples, categories, out_dir: Path, assets: Path, title: str, limit: int | None) -> Path:
    by_id = {c.id: c for c in categories}
    cards = []
    for n, item in enumerate(samples):
        if limit is not None and n >= limit:
            break
        sample, extras = item if isinstance(item, tuple) else (item, None)
        figures = []
        for k, (name, array) in enumerate(sample_panels(sample, by_id, extras)):
            file = f"{n:06d}-{k}.png"
            _save(array, assets / file)
            figures.append(
                f'<figure><img src="assets/{file}" alt="{html.escape(name)}" width="{array.shape[1]}" '
                f'height="{array.shape[0]}"><figcaption>{html.escape(name)}</figcaption></figure>'
            )
        caption = html.escape(sample.caption or "(no caption)")
        meta = html.escape(_format_scores(sample.meta or {}))
        cards.append(
            f'<div class="sample" id="s-{html.escape(str(sample.id))}"><p><b>{html.escape(str(sample.id))}</b> — {caption}</p>'
            f'<p class="meta">{meta}</p>{"".join(figures)}</div>'
        )
    legend = "".join(
        f'<span><i style="background: rgb{class_colour(c.id)}"></i>{html.escape(c.name)}</span>' for c in categories
    )
    page = (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>\n"
        f"<body><h1>{html.escape(title)}</h1><p>{len(cards)} samples</p><div class=\"legend\">{legend}</div>\n"
        + "\n".join(cards)
        + "\n</body></html>\n"
    )
    index = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    old = out_dir / "assets"
    if old.exists():  # a re-run must not leave another dataset's pictures
        shutil.rmtree(old)
    os.replace(assets, old)
    os.replace(tmp, index)
    return index


def build_gallery(path: str | os.PathLike, out: str | os.PathLike | None = None, limit: int | None = 100) -> Path:
    """Gallery of a labelled folder or a shard folder; written to ``out`` (default ``path/gallery``)."""
    from datasetdm.formats.shards import is_shard_folder, read_shards, shard_categories

    path = Path(path)
    if not path.is_dir():
        raise DatasetdmError(f"{path}: not a folder (expected a labelled folder or a shard folder)")
    out = Path(out) if out is not None else path / "gallery"
    if is_shard_folder(path):
        categories = shard_categories(path)
        samples = read_shards(path, with_extras=True)
    else:
        from datasetdm.formats.labelled_folder import read_labelled_folder

        folder = read_labelled_folder(path)
        categories, samples = folder.categories, iter(folder)
    return write_gallery(samples, categories, out, title=f"datasetdm: {path.name}", limit=limit)


def gallery_summary(index: Path) -> dict:
    """How many samples and images a written gallery has (for CLI output)."""
    text = index.read_text(encoding="utf-8")
    return {"samples": text.count('class="sample"'), "images": text.count("<img ")}


__all__ = ["build_gallery", "write_gallery", "sample_panels", "class_colour", "depth_colours", "gallery_summary"]


def contact_sheet(samples: Sequence[LabelledSample], categories: dict[int, Category], out: str | os.PathLike) -> Path:
    """One PNG: a row per sample (image and every overlay it has), its caption underneath."""
    from PIL import ImageDraw

    rows = [sample_panels(s, categories) for s in samples]
    cell = max(p.shape[0] for r in rows for _, p in r)
    cols = max(len(r) for r in rows)
    pad, text_h = 4, 14
    width = cols * (cell + pad) + pad
    canvas = Image.new("RGB", (width, len(rows) * (cell + 2 * text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for sample, panels in zip(samples, rows):
        for c, (title, array) in enumerate(panels):
            x = pad + c * (cell + pad)
            draw.text((x, y), title, fill=(90, 90, 90))
            canvas.paste(Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)), (x, y + text_h))
        draw.text((pad, y + text_h + cell + 1), (sample.caption or "")[: width // 6], fill=(0, 0, 0))
        y += cell + 2 * text_h + pad
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
