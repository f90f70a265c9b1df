"""A contact sheet of generated samples with their prompts, for the README (issue 4, item 3)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 192  # 64 px samples are shown at 3x, nearest neighbour (their real pixels)
PAD = 8


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def render_sheet(images: np.ndarray, prompts: list[str], columns: int = 4, title: str = "") -> Image.Image:
    """Grid of uint8 (N, H, W, 3) images, each with its prompt wrapped under it."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    font, title_font = _font(12), _font(14)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(p, font, TILE, scratch) for p in prompts]
    line_h = 15
    text_h = line_h * max((len(w) for w in wrapped), default=1) + 4
    rows = -(-len(images) // columns)
    cell_w, cell_h = TILE + PAD, TILE + text_h + PAD
    top = 26 if title else PAD
    sheet = Image.new("RGB", (columns * cell_w + PAD, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, 6), title, fill=(0, 0, 0), font=title_font)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = PAD + (i % columns) * cell_w, top + (i // columns) * cell_h
        tile = Image.fromarray(np.asarray(image, np.uint8)).resize((TILE, TILE), Image.NEAREST)
        sheet.paste(tile, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + TILE + 3 + j * line_h), line, fill=(20, 20, 20), font=font)
    return sheet


def contact_sheet(
    backbone_dir: str | Path, out: str | Path, n: int = 16, columns: int = 4, steps: int = 25,
    guidance: float = 4.0, seed: int = 0, log: Callable[[str], None] = lambda m: None,
) -> Path:
    """Generate one sample per caption of the first ``n`` non-empty test-split scenes (the gate's
    prompts and seeds) and write the sheet to ``out``."""
    from datasetdm.embedded.gates import TEST_SEED, exported_step, generate_images, render_set
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.io import atomic_path, sample_seed

    t0 = time.time()
    backbone = load_backbone(backbone_dir)
    scenes = render_set("test", TEST_SEED, n, skip_empty=True)
    seeds = [sample_seed(seed, i, "backbone-gates") for i in scenes.indices]
    images = generate_images(backbone, scenes.captions, seeds, steps, guidance, batch_size=16, log=log)
    step = exported_step(backbone_dir)
    title = (f"embedded backbone{f' (UNet step {step})' if step is not None else ''}: DDIM {steps} steps, "
             f"guidance {guidance}; prompts = captions of world test scenes")
    sheet = render_sheet(images, scenes.captions, columns=columns, title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    log(f"sheet: {len(images)} samples in {time.time() - t0:.0f} s")
    return out
