"""Which labeler is right more often? DatasetDM's P-Decoder against Dataset Diffusion's attention.

Both label the *same* generated images: each batch is generated once with the attention
labeler's ``generate_fn`` (class names appended to the caption, class-prompt side branch,
self-attention captured) and every hypercolumn the decoder reads is captured in the same pass,
so the two labelers differ only in how they turn one set of captured maps into a mask.

Truth on generated images is unknown, so both are scored against the gates' reference segmenter
(a pixel U-Net trained on 20k world images with ground truth, ``embedded/gates.py``), which
never sees either labeler's output:

- ``agreement_miou``: mIoU of the labeler's semantic map against the reference's prediction,
  pixels the labeler marks uncertain (255) left out;
- ``coverage``: fraction of pixels the labeler does label (not 255);
- with ``--min-pixel-confidence T``, ``decoder@T``: the decoder with pixels whose winning class
  holds less than T of the class scores left as 255 (``datasetdm generate --min-pixel-confidence``);
- ``annotate_ms_per_sample``: time of the labelling step alone (generation is shared; see
  ``bench/generation.py`` for the whole cost and peak memory of each mode).

The reference's own mIoU on real held-out world images is printed as its credibility.

    python bench/labelers.py [--backbone DIR] [--decoder CKPT] [--n 100] [--steps 25]

Without ``--decoder``, a semantic decoder is trained on the 100 few-shot world images (as the
demo does). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=None, help="Backbone folder (default: the embedded one).")
    ap.add_argument("--decoder", default=None, help="Semantic decoder checkpoint (default: train one).")
    ap.add_argument("--n", type=int, default=100, help="Generated images.")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=600, help="Decoder iterations when training one.")
    ap.add_argument("--min-pixel-confidence", default="", help="Comma-separated thresholds: also score the "
                    "decoder with its uncertain pixels ignored at each (``decoder@T`` figures).")
    ap.add_argument("--reference-cache", default="runs/reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="Also save images and both label sets to this .npz.")
    ap.add_argument("--png", default=None, help="Also draw the first 8 images with the reference's and both "
                    "labelers' maps (VOC palette, 255 = white) to this PNG, e.g. docs/labelers.png.")
    args = ap.parse_args()

    import numpy as np
    import torch

    from datasetdm.embedded import gates
    from datasetdm.backbone.loader import embedded_backbone_path, load_backbone
    from datasetdm.io import sample_seed
    from datasetdm.labelers.registry import create_labeler
    from datasetdm.prompts import Prompt, classes_in_text
    from datasetdm.world.render import CATEGORIES, render_scene

    torch.set_num_threads(args.threads)
    source = args.backbone or str(embedded_backbone_path())
    work = Path(tempfile.mkdtemp(prefix="bench-labelers-"))
    decoder_path = args.decoder
    if decoder_path is None:
        from datasetdm.training import train_decoders
        from datasetdm.world.folders import render_world_folder as render_world

        log("training a semantic decoder on the 100 few-shot world images")
        train_dir = render_world(work / "train", "train", 0, 100)
        decoder_path = train_decoders(train_dir, work / "decoders", ["semantic"], source, args.iterations,
                                      show_progress=False)["semantic"]
    bb = load_backbone(source)
    setting = dict(steps=args.steps, guidance=args.guidance)
    attention = create_labeler("attention", bb, categories=CATEGORIES, **setting)

    def decoder_labels(min_pixel_confidence=None):
        # one labeling per threshold, each with its own predictor: every annotator makes its own
        # decoder inputs, so its annotate time is its whole cost
        annotators = create_labeler("decoder", bb, decoders=[decoder_path], min_pixel_confidence=min_pixel_confidence,
                                    **setting).annotators
        if list(annotators) != ["semantic"]:
            raise SystemExit(f"{decoder_path}: a semantic decoder is needed, not {', '.join(annotators)}")
        return annotators["semantic"]

    labelers = {"decoder": decoder_labels(), "attention": attention.annotators["attention"]}
    for t in filter(None, args.min_pixel_confidence.split(",")):
        labelers[f"decoder@{float(t):g}"] = decoder_labels(float(t))
    # one pass for both: the attention labeling's generation also captures every hypercolumn the
    # decoder reads, and a decoder annotator labels whatever hypercolumns it is given
    generate = attention.generate_fn
    reference = gates.reference_segmenter(gates.ReferenceConfig(), args.reference_cache, log=log)

    texts = [render_scene("val", args.seed, i).caption for i in range(args.n)]
    names = [c.name for c in CATEGORIES]
    images, labels = [], {k: [] for k in labelers}
    seconds = {k: 0.0 for k in labelers}
    t_gen = 0.0
    for start in range(0, args.n, args.batch):
        batch = texts[start : start + args.batch]
        seeds = [sample_seed(args.seed, start + j, "bench-labelers") for j in range(len(batch))]
        t0 = time.perf_counter()
        out, hc = generate(batch, seeds)
        t_gen += time.perf_counter() - t0
        out = np.asarray(out)
        prompts = [Prompt(t, classes_in_text(t, names)) for t in batch]
        for name, annotate in labelers.items():
            t0 = time.perf_counter()
            labelled = annotate(out, hc, prompts)
            seconds[name] += time.perf_counter() - t0
            labels[name].extend(s.semantic for s in labelled)
        images.append(out)
        log(f"  {start + len(batch)}/{args.n} generated and labelled")
    images = np.concatenate(images)
    labels = {k: np.stack(v) for k, v in labels.items()}
    ref = gates.predict(reference, images)["semantic"]
    if ref.shape[1:] != images.shape[1:3]:
        raise SystemExit(f"reference predicts {ref.shape[1:]} for {images.shape[1:3]} images")

    num_classes = gates.NUM_CLASSES["semantic"]
    real = gates.render_set("test", gates.TEST_SEED, 200)
    result = {
        "backbone": source, "n": args.n, "steps": args.steps, "guidance": args.guidance,
        "reference_real_miou": round(gates.segmenter_miou(reference, real)["semantic"], 4),
        "generate_s_per_sample": round(t_gen / args.n, 4),
    }
    for name, lab in labels.items():
        result[f"{name}_agreement_miou"] = round(gates.miou(ref, lab, num_classes), 4)
        result[f"{name}_coverage"] = round(float((lab != 255).mean()), 4)
        result[f"{name}_annotate_ms_per_sample"] = round(1000 * seconds[name] / args.n, 2)
    # the two labelers against each other, where both label
    both = np.where(labels["attention"] == 255, 255, labels["decoder"])
    result["decoder_vs_attention_miou"] = round(gates.miou(labels["attention"], both, num_classes), 4)
    if args.save:
        np.savez_compressed(args.save, images=images, reference=ref, **labels)
    if args.png:
        draw_rows(args.png, images[:8], {"reference": ref[:8], **{k: v[:8] for k, v in labels.items()}})
    print(json.dumps(result), flush=True)


def draw_rows(path: str, images, maps: dict, scale: int = 3) -> None:
    """One row per kind (generated images, then each label map), one column per image."""
    import numpy as np
    from PIL import Image, ImageDraw

    from datasetdm.formats.png import voc_palette

    palette = np.array(voc_palette(), np.uint8).reshape(256, 3).copy()
    palette[255] = 255
    rows = [("generated", images)] + [(name, palette[m]) for name, m in maps.items()]
    h, w = images.shape[1] * scale, images.shape[2] * scale
    label_w = 90
    sheet = Image.new("RGB", (label_w + w * len(images), h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, tiles) in enumerate(rows):
        draw.text((4, r * h + h // 2 - 6), name, fill="black")
        for c, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile).resize((w, h), Image.NEAREST), (label_w + c * w, r * h))
    sheet.save(path)


if __name__ == "__main__":
    main()
