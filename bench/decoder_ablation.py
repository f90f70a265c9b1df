"""Why the semantic P-Decoder scores below a 1×1 probe on the same hypercolumns: an ablation.

The same 100 world train-split scenes (views cached once), the same 500 test-split scenes, the
same training loop (``training.Trainer``); one change at a time:

- ``base``: the decoder as ``datasetdm train`` built it before this ablation (4 views per image,
  template prompts); its results set today's defaults, ``caption+v16``;
- ``std``: every feature channel standardised with training-set statistics (the probe does this;
  the decoder otherwise only GroupNorms after its 1×1 fusion conv);
- ``caption``: prompts are the scenes' captions instead of the class template;
- ``noatt``: no cross-attention maps fused;
- ``pixel``: a per-pixel classifier (1×1 conv on the pixel embeddings, cross-entropy) instead of
  mask classification; ``dice`` adds a soft dice loss per class to it;
- ``noimg``: no image path in the pixel decoder (features only);
- ``v8``, ``v16``: 8 or 16 views per image (original + augmented) instead of 4;
- ``wd``: weight decay 0.05 instead of 1e-4; ``half``, ``x2``: half or twice the iterations;
- combinations joined with ``+``.

    python bench/decoder_ablation.py --train runs/fewshot --test runs/test500 --out runs/ablation \
        --variants base std std+pixel

The last printed line is JSON: test (and train) mIoU per variant; docs/decoder-ablation.json holds
the runs behind the README's table (about 3 min per variant on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F


def standardise(train, test):
    """Per-channel (x − mean) / std with the training views' statistics, both sets."""
    from datasetdm.decoder.inputs import DecoderInput

    stats = [(f.float().mean((0, 2, 3), keepdim=True), f.float().std((0, 2, 3), keepdim=True).clamp_min(1e-6))
             for f in train.features]

    def apply(inp):
        return DecoderInput([((f.float() - m) / s).half() for f, (m, s) in zip(inp.features, stats)],
                            inp.class_attention, inp.image, inp.image_size)

    return apply(train), apply(test)


class PixelHead(torch.nn.Module):
    """Per-pixel classification on the P-Decoder's pixel embeddings (for the ablation only)."""

    def __init__(self, decoder, num_classes, dice: bool = False):
        super().__init__()
        self.d, self.dice = decoder, dice
        self.cls = torch.nn.Conv2d(decoder.cfg.dim, num_classes, 1)
        self.value_to_index = decoder.head.value_to_index
        self.index_to_value = decoder.head.index_to_value

    def forward(self, inp, **kw):
        fused = self.d.fusion(inp.features, self.d._attention(inp))
        _, pixel_embed = self.d.pixel_decoder(fused, inp.image if self.d.cfg.use_image else None)
        logits = self.cls(pixel_embed)
        if tuple(logits.shape[-2:]) != tuple(inp.image_size):
            logits = F.interpolate(logits, size=inp.image_size, mode="bilinear", align_corners=False)
        return logits

    def loss(self, logits, targets):
        y = torch.stack([t["index"] for t in targets])
        loss = F.cross_entropy(logits, y, ignore_index=255)
        if self.dice:  # soft dice per class, so a small class weighs as much as a large one
            valid = (y != 255)[:, None]
            p = logits.softmax(1) * valid
            onehot = F.one_hot(y.clamp_max(logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2) * valid
            inter, total = (p * onehot).sum((0, 2, 3)), (p + onehot).sum((0, 2, 3))
            present = onehot.sum((0, 2, 3)) > 0
            loss = loss + (1 - (2 * inter + 1) / (total + 1))[present].mean()
        return loss, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=["base", "std", "pixel", "std+pixel", "caption", "noatt"])
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="seeds the decoder's initialisation and batch order (not the views)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))

    from datasetdm.decoder.build import build_decoder
    from datasetdm.evaluation.metrics import SemanticIoU
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.training import (TrainOptions, Trainer, augment, cached_inputs, make_decoder_config, prepare,
                                    prompt_for)

    args.out.mkdir(parents=True, exist_ok=True)
    # the decoder as it was before this ablation: 4 views, template prompts
    base_opts = TrainOptions(task="semantic", iterations=args.iterations, views=4, prompt="template",
                             cache_dir=str(args.out / "features"), feature_cache="memory")  # variants edit inputs in RAM
    t0 = time.time()
    prep = prepare(args.train, base_opts)
    categories = prep.decoder.cfg.categories
    source = prep.source
    test = read_labelled_folder(args.test)
    size = tuple(prep.decoder.cfg.image_size)
    test_samples = [test[i] for i in range(min(args.n_test, len(test)))]
    test_views = [augment(s, None, size) for s in test_samples]
    features = args.out / "features"
    # test views get the same timestep-noise seeds as training views (``view_noise_seeds``, seed 0)
    inputs = {
        "template": (prep.trainer.inp, cached_inputs(test_views, [prompt_for(v, categories) for v in test_views],
                                                     source, base_opts, features / "test-template.safetensors")),
    }
    print(f"features ready in {time.time() - t0:.0f} s", flush=True)

    def caption_inputs(p, views):
        if ("caption", views) not in inputs:
            tr = cached_inputs(p.views, [v.caption for v in p.views], source, base_opts,
                               features / f"train-caption-v{views}.safetensors")
            te = cached_inputs(test_views, [v.caption for v in test_views], source, base_opts,
                               features / "test-caption.safetensors")
            inputs[("caption", views)] = (tr, te)
        return inputs[("caption", views)]

    preps = {base_opts.views: prep}

    def prepared(views):
        if views not in preps:
            preps[views] = prepare(args.train, replace(base_opts, views=views))
        return preps[views]

    # earlier variants of this seed stay in the file: a run adds to it
    results_file = args.out / ("results.json" if args.seed == 0 else f"results-seed{args.seed}.json")
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for variant in args.variants:
        parts = set(variant.split("+"))
        views = next((int(p[1:]) for p in parts if p[0] == "v" and p[1:].isdigit()), base_opts.views)
        prep = prepared(views)
        tr, te = caption_inputs(prep, views) if "caption" in parts else (prep.trainer.inp, inputs["template"][1])
        if "std" in parts:
            tr, te = standardise(tr, te)
        opts = replace(base_opts, views=views, attention="noatt" not in parts, use_image="noimg" not in parts,
                       weight_decay=0.05 if "wd" in parts else base_opts.weight_decay,
                       iterations=int(base_opts.iterations * (0.5 if "half" in parts else 2 if "x2" in parts else 1)))
        cfg = make_decoder_config(opts, categories, tr, source)
        torch.manual_seed(args.seed)
        decoder = build_decoder(cfg)
        targets = [decoder.targets(v) for v in prep.views]
        model = decoder
        if "pixel" in parts:
            model = PixelHead(decoder, len(categories) + 1, dice="dice" in parts)
            for t in targets:
                lut = np.full(256, 255, np.int64)
                for v, i in decoder.head.value_to_index.items():
                    lut[v] = i
                t["index"] = torch.as_tensor(lut[t["semantic"].numpy()])
        trainer = Trainer(model, tr, targets, replace(opts, seed=args.seed))  # the views keep seed 0
        t1 = time.time()
        while trainer.step_no < opts.iterations:
            logs = trainer.step()
            if trainer.step_no % 250 == 0:
                print(f"{variant} step {trainer.step_no} loss {logs['loss']:.4f}", flush=True)
        train_s = time.time() - t1

        @torch.no_grad()
        def score(inp, samples):
            metric = SemanticIoU([c["id"] for c in categories])
            model.eval()
            for b in range(0, len(samples), 50):
                sub = inp.select(slice(b, b + 50)).to(dtype=torch.float32)
                if "pixel" in parts:
                    pred = decoder.head.index_to_value[model(sub).argmax(1).numpy()]
                else:
                    pred = np.stack([p["semantic"] for p in decoder.predict(sub)])
                for p, s in zip(pred, samples[b:b + 50]):
                    metric.update(p, s.semantic)
            return metric.compute()

        test_m = score(te, test_views)
        plain = list(range(0, len(prep.views), opts.views))  # the un-augmented view of each image
        train_m = score(tr.select(plain), [prep.views[i] for i in plain])
        results[variant] = {"test_miou": round(test_m["miou"], 4), "train_miou": round(train_m["miou"], 4),
                            "train_seconds": round(train_s, 1),
                            "iou": {k: round(v, 3) for k, v in test_m["iou"].items()}}
        print(variant, json.dumps(results[variant]), flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    print(json.dumps({"seed": args.seed, **{k: {"test_miou": v["test_miou"], "train_miou": v["train_miou"]}
                                            for k, v in results.items() if k in args.variants}}))


if __name__ == "__main__":
    main()
