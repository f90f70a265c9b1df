"""Decoder training from cached hypercolumns vs recomputing the UNet every iteration (issue 5, item 5).

Both runs train the same semantic decoder from the same initial weights on the same views, batches
and timestep-noise seeds (``datasetdm.training``); the only difference is where a batch's
hypercolumns come from:

- cached: every view (image + augmented views) goes through the VAE and UNet once before training
  (that time counts), then each step reads the cache;
- recompute: the reference code's way, the UNet runs on the batch's views at every step.

Validation mIoU on held-out images (their hypercolumns computed once, outside both timings) is
measured every ``--val-every`` steps. The target is ``--target-miou``, else ``--target-fraction``
(0.9) × the best mIoU the cached run reached. Time to target: training seconds until the first
validation at or above it (cache time included for the cached run; backbone loading excluded).
A recompute run that passes ``--max-recompute-seconds`` stops there; its time to target is then
its mean step time × the steps the cached run needed (``extrapolated: true``; the runs follow the
same trajectory up to float differences, reported as ``max_miou_gap`` over the shared steps).

    python bench/decoder_training.py                      # embedded backbone, world images
    python bench/decoder_training.py --tiny --iterations 60 --n-images 8 --n-val 8   # smoke test
    python bench/decoder_training.py --sd15-shaped --image-size 256 --views 1   # Stable Diffusion's cost

``--sd15-shaped`` runs Stable Diffusion 1.5's architecture with random weights (no download): the
hypercolumns carry no semantics, so the mIoU is low, but both runs follow the same trajectory and
the time each step costs is the real model's, which is what the speedup is about.

The decoder is built as ``datasetdm train`` builds it: from 256 px up its masks are predicted at
1/4 of the image with point-sampled mask losses (``--mask-stride`` / ``--point-loss-points``,
default "auto"; ``--mask-stride 1 --point-loss-points 0`` is the full-resolution decoder the first
SD-shaped figures used). ``--step-timing N`` times N decoder steps only, full-resolution settings
against the chosen ones, on random hypercolumns of SD 1.5's shapes (no UNet, a minute or two):

    python bench/decoder_training.py --sd15-shaped --image-size 256 --step-timing 5 --threads 2

The speedup is bounded twice: by how often each cached view is reused before the target (steps ×
batch / views), and by (UNet time per batch + decoder step) / decoder step. So it grows with the
backbone's cost: the embedded backbone's UNet is small (on 2 CPU cores a batch of 8 costs about
as much as a decoder step), Stable Diffusion's is not. The last printed line is JSON
with ``speedup``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def world_folder(path: Path, split: str, n: int, size: int | None = None) -> Path:
    """World scenes, resized to ``size`` × ``size`` when given (labels follow, nearest-neighbour)."""
    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.training import augment
    from datasetdm.world.render import CATEGORIES, render_scene

    with LabelledFolderWriter(path, list(CATEGORIES)) as w:
        for i in range(n):
            scene = render_scene(split, 0, i)
            w.add(scene if size is None else augment(scene, None, (size, size)))
    return path


class Validator:
    """Held-out images at the decoder's size, their inputs computed once; ``miou(decoder)``."""

    def __init__(self, folder_path, prep, n: int, batch: int = 16):
        from datasetdm.decoder.inputs import DecoderInput
        from datasetdm.formats.labelled_folder import read_labelled_folder
        from datasetdm.io import sample_seed
        from datasetdm.training import augment, prompt_for

        folder = read_labelled_folder(folder_path)
        cfg = prep.decoder.cfg
        size = tuple(cfg.image_size)
        self.views = [augment(folder[i], None, size) for i in range(min(n, len(folder)))]
        parts = []
        for b in range(0, len(self.views), batch):
            chunk = self.views[b : b + batch]
            prompts = [prompt_for(v, cfg.categories, mode=cfg.prompt) for v in chunk]
            seeds = [sample_seed(0, b + j, "val-noise") for j in range(len(chunk))]
            parts.append(prep.source.extract([v.image for v in chunk], prompts, seeds))
        self.inp = DecoderInput.stack(parts)
        self.ids = [c["id"] for c in cfg.categories]

    def miou(self, decoder) -> float:
        from datasetdm.evaluation.metrics import SemanticIoU

        iou = SemanticIoU(self.ids)
        n = len(self.views)
        for b in range(0, n, 32):
            idx = list(range(b, min(n, b + 32)))
            for v, p in zip([self.views[i] for i in idx], decoder.predict(self.inp.select(idx))):
                iou.update(p["semantic"], v.semantic)
        return float(iou.compute()["miou"])


def run(trainer, validator, iterations, val_every, batch_fn=None, target=None, budget=None):
    """Train; validate every ``val_every`` steps. Returns [(step, train seconds, mIoU)], the mean
    step time and the mean time of making a step's batch (reading the cache or running the UNet,
    and the views' targets: what ``Trainer.step()`` does before the decoder runs). Stops at
    ``target`` or past ``budget`` seconds when given."""
    import torch

    if batch_fn is None:  # what trainer.step() does without arguments
        def batch_fn(idx):
            return trainer.inp.select(idx), [trainer.targets[i] for i in idx.tolist()]

    curve, seconds, batch_seconds = [], 0.0, 0.0
    for step in range(1, iterations + 1):
        t = time.perf_counter()
        batch = batch_fn(trainer.batch_indices())
        batch_seconds += time.perf_counter() - t
        trainer.step(*batch)
        seconds += time.perf_counter() - t
        if step % val_every == 0 or step == iterations:
            with torch.no_grad():
                curve.append((step, seconds, validator.miou(trainer.decoder)))
            print(f"  step {step}: {seconds:.1f}s mIoU {curve[-1][2]:.3f}", flush=True)
            if target is not None and curve[-1][2] >= target:
                break
        if budget is not None and seconds > budget:  # every step: a recompute step can take seconds
            break
    return curve, seconds / step, batch_seconds / step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=None, help="diffusers folder or hub id (default: embedded)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random SD-shaped backbone (smoke test)")
    ap.add_argument("--sd15-shaped", action="store_true", help="Stable Diffusion 1.5's architecture, random weights")
    ap.add_argument("--image-size", type=int, default=None, help="resize the world images to this side (px)")
    ap.add_argument("--data", type=Path, help="labelled training folder (default: world train split)")
    ap.add_argument("--val", type=Path, help="labelled validation folder (default: world val split)")
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--target-miou", type=float, default=None)
    ap.add_argument("--target-fraction", type=float, default=0.9)
    ap.add_argument("--max-recompute-seconds", type=float, default=600.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 for backbone and decoder "
                    "(default: fp16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask-stride", default="auto", help="decoder mask stride: auto | N (1: full resolution)")
    ap.add_argument("--point-loss-points", default="auto", help="points per mask for the mask losses: auto | N (0: dense)")
    ap.add_argument("--step-timing", type=int, default=0, metavar="N",
                    help="only time N decoder steps (batch --batch-size), full-resolution vs chosen settings, "
                    "on random SD 1.5-shaped hypercolumns (with --sd15-shaped)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_decoder_"))
    try:
        print(json.dumps(step_timing(args) if args.step_timing else bench(args, tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _auto_int(value):
    return value if value == "auto" else int(value)


# SD 1.x hypercolumns (up-block outputs, highest resolution first): channels, and stride in latent px
SD15_LEVELS = ((320, 1), (640, 2), (1280, 4), (1280, 8))


def step_timing(args) -> dict:
    """Seconds per decoder step (wall and this process's CPU), full-resolution decoder (mask stride
    1, dense losses: the old one) against the settings chosen, on the same random SD 1.5-shaped
    hypercolumns and world-scene targets. The UNet is not run: this is the cached step only."""
    import torch

    from datasetdm.decoder import DecoderConfig, DecoderInput, build_decoder
    from datasetdm.decoder.build import resolve_mask_resolution
    from datasetdm.training import Trainer, TrainOptions, augment
    from datasetdm.world.render import CATEGORIES, render_scene

    if not args.sd15_shaped:
        raise SystemExit("--step-timing needs --sd15-shaped (the shapes it times)")
    size, B = args.image_size or 512, args.batch_size
    cats = [{"id": int(c.id), "name": c.name} for c in CATEGORIES]
    latent = size // 8
    chans = [c for c, _ in SD15_LEVELS]
    sizes = [[latent // s] * 2 for _, s in SD15_LEVELS]
    g = torch.Generator().manual_seed(args.seed)
    inp = DecoderInput([torch.randn(B, c, h, w, generator=g) for c, (h, w) in zip(chans, sizes)],
                       [torch.rand(B, len(cats), h, w, generator=g) for h, w in sizes],
                       torch.rand(B, 3, size, size, generator=g), (size, size))
    scenes = [augment(render_scene("train", 0, i), None, (size, size)) for i in range(B)]
    chosen = resolve_mask_resolution("semantic", (size, size), _auto_int(args.mask_stride),
                                     _auto_int(args.point_loss_points))
    result = {}
    for name, (stride, points) in (("full_resolution", (1, 0)), ("chosen", chosen)):
        cfg = DecoderConfig(task="semantic", categories=cats, feature_channels=chans, feature_sizes=sizes,
                            image_size=[size, size], mask_stride=stride, point_loss_points=points)
        torch.manual_seed(args.seed)
        decoder = build_decoder(cfg)
        opts = TrainOptions(task="semantic", batch_size=B, seed=args.seed, device=args.device, dtype=args.dtype)
        trainer = Trainer(decoder, None, [decoder.targets(s) for s in scenes], opts)
        targets = list(trainer.targets)
        trainer.step(inp, targets)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        losses = [trainer.step(inp, targets)["loss"] for _ in range(args.step_timing)]
        result[name] = {"mask_stride": stride, "point_loss_points": points,
                        "seconds_per_step": round((time.perf_counter() - wall) / args.step_timing, 4),
                        "cpu_seconds_per_step": round((time.process_time() - cpu) / args.step_timing, 4),
                        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)]}
        print(f"  {name}: {result[name]}", flush=True)
    full, new = result["full_resolution"], result["chosen"]
    return {**result, "step_ratio": round(full["seconds_per_step"] / new["seconds_per_step"], 2),
            "cpu_step_ratio": round(full["cpu_seconds_per_step"] / new["cpu_seconds_per_step"], 2),
            "image_size": [size, size], "batch_size": B, "steps": args.step_timing, "threads": args.threads,
            "backbone": "sd15-shaped (random hypercolumns)"}


def bench(args, tmp: Path) -> dict:
    import torch

    from datasetdm.decoder import build_decoder
    from datasetdm.training import Trainer, TrainOptions, cached_inputs, prepare

    backbone = args.backbone
    if args.tiny:
        from datasetdm.testing import make_tiny_backbone

        backbone = str(make_tiny_backbone(tmp / "tiny", text_encoder="clip"))
    if args.sd15_shaped:
        from datasetdm.testing import make_sd15_shaped_backbone

        backbone = str(make_sd15_shaped_backbone(tmp / "sd15", sample_size=args.image_size or 512))
    data = args.data or world_folder(tmp / "train", "train", args.n_images, args.image_size)
    val = args.val or world_folder(tmp / "val", "val", args.n_val, args.image_size)
    opts = TrainOptions(task="semantic", n_images=args.n_images, views=args.views, iterations=args.iterations,
                        batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                        mask_stride=_auto_int(args.mask_stride), point_loss_points=_auto_int(args.point_loss_points))

    prep = prepare(data, opts, backbone)  # loads the backbone and builds the cache (untimed: warm-up)
    cfg, source, views = prep.decoder.cfg, prep.source, prep.views
    t = time.perf_counter()
    cached_inputs(views, prep.prompts, source, opts, None)  # the cache again, timed, backbone warm
    cache_seconds = time.perf_counter() - t
    validator = Validator(val, prep, args.n_val)
    print(f"cache: {len(views)} views in {cache_seconds:.1f}s", flush=True)

    print("cached:", flush=True)
    cached_curve, cached_step, cached_batch = run(prep.trainer, validator, args.iterations, args.val_every)
    best = max(m for _, _, m in cached_curve)
    target = args.target_miou if args.target_miou is not None else args.target_fraction * best
    hit = next(((s, sec) for s, sec, m in cached_curve if m >= target), None)
    if hit is None:
        raise SystemExit(f"the cached run never reached mIoU {target:.3f} (best {best:.3f}): lower --target-miou")
    cached_steps, cached_train = hit
    cached_seconds = cache_seconds + cached_train

    print("recompute:", flush=True)
    torch.manual_seed(opts.seed)  # the same initial weights as the cached run (see training.prepare)
    decoder = build_decoder(cfg)
    trainer = Trainer(decoder, None, prep.trainer.targets, opts, prep.trainer.forward_kw)

    def batch(idx):
        idx = idx.tolist()
        inp = source.extract([views[i].image for i in idx], [prep.prompts[i] for i in idx],
                             [prep.noise_seeds[i] for i in idx])
        return inp, [prep.trainer.targets[i] for i in idx]

    re_curve, re_step, re_batch = run(trainer, validator, args.iterations, args.val_every, batch, target,
                                      args.max_recompute_seconds)
    re_hit = next(((s, sec) for s, sec, m in re_curve if m >= target), None)
    extrapolated = re_hit is None
    re_seconds = re_hit[1] if re_hit else re_step * cached_steps
    shared = {s: m for s, _, m in re_curve}
    gap = max((abs(m - shared[s]) for s, _, m in cached_curve if s in shared), default=None)

    return {
        "speedup": round(re_seconds / cached_seconds, 2),
        "target_miou": round(target, 4),
        "best_cached_miou": round(best, 4),
        "cached_seconds": round(cached_seconds, 2),
        "cache_seconds": round(cache_seconds, 2),
        "cached_steps_to_target": cached_steps,
        "recompute_seconds": round(re_seconds, 2),
        "recompute_steps_to_target": re_hit[0] if re_hit else None,
        "extrapolated": extrapolated,
        "max_miou_gap": None if gap is None else round(gap, 4),
        "seconds_per_step": {"cached": round(cached_step, 4), "recompute": round(re_step, 4)},
        # of which making the batch: cache read + targets (cached), UNet pass + targets (recompute)
        "batch_seconds_per_step": {"cached": round(cached_batch, 4), "recompute": round(re_batch, 4)},
        "decoder_step_seconds": round(cached_step, 4),  # the cached step is the decoder step alone
        "mask_stride": cfg.mask_stride,
        "point_loss_points": cfg.point_loss_points,
        "views": len(views),
        "batch_size": args.batch_size,
        "backbone": "sd15-shaped-random" if args.sd15_shaped else "tiny-random" if args.tiny else source.description["source"],
        "image_size": list(cfg.image_size),
        "threads": args.threads,
        "device": str(source.device) if source.backbone is not None else args.device,
        "dtype": str(source.dtype).replace("torch.", ""),
    }


if __name__ == "__main__":
    main()
