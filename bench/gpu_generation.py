"""The GPU fast path against diffusers' own pipeline (issue 19, item 5).

Stable Diffusion 1.5's architecture with random weights (``datasetdm.testing.family_shaped_components``,
no download) at 512 px, 25 DDIM steps, classifier-free guidance, batch 8, fp16:

- annotated generation: ``backbone.capture.generate`` (hypercolumns captured at the last step)
  followed by a semantic and a depth P-Decoder labelling every image from them (random decoder
  weights: the cost is the architecture's), against ``diffusers.StableDiffusionPipeline`` built
  from the very same modules and scheduler, same prompts and per-sample seeds. Reported: seconds
  per batch of each, their ratio (goal ≤ 1.05), peak GPU memory of each and its ratio (goal ≤ 1.2),
  samples/s, and the mean absolute pixel difference between the two paths' images (near 0: they
  run the same denoising; fp16 kernels may differ in the last bit).
- decoder training from cached features against recomputing the UNet each step: run by
  ``bench/decoder_training.py --sd15-shaped`` (``--training``; goal ≥ 20× faster to the same
  validation mIoU), its JSON line kept under ``decoder_training``.

Each timed block runs once untimed first (kernel selection, allocator), then ``--repeats`` times;
CUDA is synchronised around every timing; peaks come from ``torch.cuda.max_memory_allocated``
after a reset (None on the CPU). The last printed line is JSON.

    python bench/gpu_generation.py                                   # a GPU: the figures above
    python bench/gpu_generation.py --device cpu --tiny --repeats 1   # smoke test (tiny random model)
    bash scripts/device/gpu_bench.sh                                 # what a lent GPU machine runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a person and a dog in a park", "a car parked next to a tree", "a cat sitting on a chair",
           "a bus on a city street", "two people walking on a beach", "a bird on a fence",
           "a boat on a lake at sunset", "a horse in a field"]


def build_backbone(args, tmp: Path):
    """The backbone the bench runs: SD 1.5's architecture (random weights), or the tiny test model."""
    import torch

    from datasetdm.backbone.device import placement
    from datasetdm.backbone.loader import Backbone, load_backbone

    device, dtype = placement(args.device, args.dtype)
    if args.tiny:
        from datasetdm.testing import make_tiny_family

        return load_backbone(make_tiny_family(tmp / "tiny", "sd15"), device=device, dtype=dtype)
    from datasetdm.testing import family_shaped_components

    parts = family_shaped_components("sd15", args.width_divisor)
    bb = Backbone(**parts, name="sd15-shaped-random", source="sd15-shaped-random", fingerprint="bench",
                  device=torch.device("cpu"), dtype=torch.float32)
    return bb.to(device, dtype)


def build_decoders(bb, image_size: int):
    """Semantic and depth P-Decoders (``train``'s default sizes) shaped for ``bb``'s hypercolumns,
    labelling through one shared ``Predictor`` as ``generate`` does (``labelers.registry``): each
    batch's decoder inputs are made once for both. Returns (predictor, annotators)."""
    import torch

    from datasetdm.backbone.capture import generate
    from datasetdm.decoder import DecoderConfig, build_decoder
    from datasetdm.decoder.predictor import Predictor
    from datasetdm.labelers.decoder import predictor_annotator

    _, hc = generate(bb, ["a photo of a dog"], [0], num_inference_steps=1, guidance_scale=1.0,
                     height=image_size, width=image_size)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["person", "dog", "car", "cat", "bus", "bird", "boat",
                                                            "horse", "chair"])]
    annotators = {}
    predictor = Predictor(tokenizer=bb.tokenizer)
    for task in ("semantic", "depth"):
        cfg = DecoderConfig(task=task, categories=cats, feature_channels=[int(f.shape[1]) for f in hc.features],
                            feature_sizes=[list(f.shape[-2:]) for f in hc.features],
                            image_size=[image_size, image_size], backbone={"fingerprint": bb.fingerprint})
        torch.manual_seed(0)
        dec = build_decoder(cfg).eval().to(bb.device)
        dec.precision = bb.dtype  # as the decoder labeler sets it
        predictor.decoders[task] = dec
        annotators[task] = predictor_annotator(predictor, task)
    return predictor, annotators


def pipeline_of(bb):
    """diffusers' StableDiffusionPipeline on the backbone's own modules and scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=type(bb.scheduler).from_config(bb.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn, repeats: int, device) -> tuple[float, int | None, object]:
    """(seconds per call, peak bytes allocated during the timed calls or None, last result)."""
    import torch

    cuda = device.type == "cuda"
    result = fn()  # warm-up
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t) / repeats
    return seconds, torch.cuda.max_memory_allocated(device) if cuda else None, result


def generation_bench(args, tmp: Path) -> dict:
    import numpy as np
    import torch

    from datasetdm.backbone.capture import generate
    from datasetdm.backbone.device import dtype_name

    bb = build_backbone(args, tmp)
    size = args.image_size if not args.tiny else bb.native_size[0]
    predictor, annotators = build_decoders(bb, size)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    seeds = list(range(args.batch))

    def ours():
        predictor.reset()  # the previous batch is freed before this one is made
        images, hc = generate(bb, prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                              height=size, width=size)
        labels = {k: ann(images, hc, [None] * len(images)) for k, ann in annotators.items()}
        return images, labels

    pipe = pipeline_of(bb)

    # the very initial noise ``generate`` draws (per seed, on the CPU, in fp32, then cast), given to
    # the pipeline as ``latents``: an image difference then comes from the denoising itself
    f = bb.vae_scale_factor
    noise = torch.cat([torch.randn((1, bb.unet.config.in_channels, size // f, size // f),
                                   generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])

    def theirs():
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                    latents=noise.to(bb.device, bb.dtype), height=size, width=size, output_type="np").images

    with torch.inference_mode():
        ours_s, ours_peak, (images, labels) = timed(ours, args.repeats, bb.device)
        theirs_s, theirs_peak, pipe_images = timed(theirs, args.repeats, bb.device)
        # the labelling share of ``ours``: both decoders on the last batch's hypercolumns
        predictor.reset()
        _, hc = generate(bb, prompts, seeds, num_inference_steps=1, guidance_scale=args.guidance, height=size,
                         width=size)
        def label():
            predictor.reset()  # the inputs are made again, as for a new batch
            return {k: ann(images, hc, [None] * len(images)) for k, ann in annotators.items()}

        label_s, _, _ = timed(label, args.repeats, bb.device)
    pipe_u8 = (np.clip(pipe_images, 0, 1) * 255).round().astype(np.uint8)
    diff = float(np.abs(images.astype(np.float32) - pipe_u8.astype(np.float32)).mean())
    sem, depth = labels["semantic"][0], labels["depth"][0]
    return {
        "datasetdm_seconds_per_batch": round(ours_s, 3),
        "pipeline_seconds_per_batch": round(theirs_s, 3),
        "time_ratio": round(ours_s / theirs_s, 4),
        "labelling_seconds_per_batch": round(label_s, 3),
        "datasetdm_peak_bytes": ours_peak,
        "pipeline_peak_bytes": theirs_peak,
        "peak_memory_ratio": None if not theirs_peak else round(ours_peak / theirs_peak, 4),
        "samples_per_second": round(args.batch / ours_s, 3),
        "pipeline_samples_per_second": round(args.batch / theirs_s, 3),
        "mean_abs_pixel_diff": round(diff, 3),
        "label_shapes": {"semantic": list(sem.semantic.shape), "depth": list(depth.depth.shape)},
        "image_size": size, "steps": args.steps, "batch": args.batch, "guidance": args.guidance,
        "dtype": dtype_name(bb.dtype), "device": str(bb.device), "repeats": args.repeats,
        "backbone": "tiny-random" if args.tiny else f"sd15-shaped-random/{args.width_divisor}",
    }


def training_bench(args) -> dict:
    """bench/decoder_training.py in a child process (its own memory and threads); its JSON line."""
    cmd = [sys.executable, str(ROOT / "bench" / "decoder_training.py"), "--device", args.device,
           "--n-images", str(args.train_images), "--n-val", str(args.train_val), "--views", str(args.train_views),
           "--iterations", str(args.train_iterations), "--val-every", str(args.train_val_every),
           "--max-recompute-seconds", str(args.max_recompute_seconds), "--batch-size", str(args.batch),
           "--threads", str(args.threads or 8)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    cmd += ["--tiny"] if args.tiny else ["--sd15-shaped", "--image-size", str(args.image_size)]
    # streamed, not collected: a run stopped by the caller's timeout still leaves its progress in the log
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = None
    for line in proc.stdout:
        if line.strip():
            if last is not None:
                print(f"  [decoder_training] {last}", flush=True)
            last = line.rstrip()
    code = proc.wait()
    if code != 0 or last is None or not last.startswith("{"):
        return {"error": f"bench/decoder_training.py exited with {code}"}
    return json.loads(last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random test model (smoke test on the CPU)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--width-divisor", type=int, default=1, help="narrow SD 1.5's widths (1: the real size)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--training", action="store_true", help="also the cached-vs-recompute decoder training bench")
    ap.add_argument("--train-images", type=int, default=100)
    ap.add_argument("--train-val", type=int, default=50)
    ap.add_argument("--train-views", type=int, default=4)
    ap.add_argument("--train-iterations", type=int, default=1500)
    ap.add_argument("--train-val-every", type=int, default=100)
    ap.add_argument("--max-recompute-seconds", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                    help="torch threads here and in the training child (default: torch's own here, 8 there)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        if not args.skip_generation:
            result["generation"] = generation_bench(args, tmp)
            print(json.dumps(result["generation"]), flush=True)
        if args.training:
            result["decoder_training"] = training_bench(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
