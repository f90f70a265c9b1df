"""Cost of hypercolumn capture: plain generation vs generation with capture, per SD family.

Same components (random weights from configs, fixed seed), prompts, seeds, steps and guidance;
the only difference is ``generate(..., capture=True)`` (features + cross-attention at the last
step) against ``capture=False``. Families (``datasetdm.testing.family_shaped_components``: the
released models' configs, random weights):

- ``sd15``: SD 1.5 (UNet 320/640/1280/1280, CLIP-L 12 layers, 768-d), native 512 px;
- ``sd21``: SD 2.1 768-v (same UNet widths, linear projections, 1024-d OpenCLIP-H text encoder
  of 23 layers, v-prediction), native 768 px;
- ``sdxl``: SDXL base (UNet 320/640/1280 with 1/2/10 transformer layers, CLIP-L + OpenCLIP-bigG,
  pooled + time-id added conditions, Euler), native 1024 px;
- ``tiny``: the tiny SD-1.5-shaped test model (32 px), seconds.

On a CPU the native sizes do not fit a benchmark's time, so the images are ``--size`` px (default
256) and ``--width-divisor`` narrows every UNet and text-encoder width (heads kept; default 1 for
sd15/sd21, 2 for sdxl, whose full 2.6 B-parameter UNet takes 30 s a step at 256 px on 2 cores).
The sizes used are printed and recorded in the JSON. On a GPU pass ``--size`` = the native size
and ``--width-divisor 1``.

Time: plain and capture runs alternate (ABBA) in one process after a warm-up; the minimum of each
is compared (the machine is shared, the minimum is the least disturbed run). On a CPU with one
torch thread the headline ``time_ratio`` compares process CPU time (``time.process_time``): the
work done, which a job sharing the cores does not inflate the way it inflates wall time (here
the same UNet forward took 6.6 to 8.6 s of wall time from one call to the next while a training
job ran); the wall-time ratio is reported beside it (``wall_time_ratio``). On a GPU the ratio is
of wall time, synchronised. Capture installs its processors and hooks only around the captured
forward, so the other steps cost exactly the same; ``forward_ratio`` times that one forward
alone (alternated plain/captured, ``--forward-repeats``), the overhead without the noise of the
identical steps. Even CPU time drifts by up to ±10 % between whole generations on a shared
machine (page faults, the other job's phases); a ``time_ratio`` below 1 is that noise, since
capture only adds work. Recording recomputes each cross-attention layer's query and key for the
conditional half (the wrapped processor's own output stays untouched, so images are
bit-identical): a few percent of the captured forward, one forward of the whole run.
Memory: each mode runs once in a fresh subprocess; peak resident set size (RSS, read from
/proc/self/statm every millisecond by a thread, and ru_maxrss) during generation, with glibc's
mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS. ``memory_ratio``
compares the process peak; ``working_memory_ratio`` compares the peak above the RSS just before
generation (weights excluded), the stricter figure.

    python bench/capture_overhead.py --family sd15         # about 4 min on 2 shared CPU cores
    python bench/capture_overhead.py --family sd15,sd21,sdxl
    python bench/capture_overhead.py --family tiny         # seconds
    python bench/capture_overhead.py --family sdxl --size 1024 --width-divisor 1 --device cuda

The last printed line is JSON with ``time_ratio`` and ``memory_ratio`` (the largest over the
families run) and each family's figures and sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a photo of a dog and a cat on a sofa"


FAMILIES = ("sd15", "sd21", "sdxl", "tiny")
DEFAULT_WIDTH_DIVISOR = {"sd15": 1, "sd21": 1, "sdxl": 2, "tiny": 1}


def build(family: str, size: int, width_divisor: int, device: str):
    from datasetdm.backbone.loader import Backbone, load_backbone
    from datasetdm.testing import family_shaped_components, make_tiny_backbone

    if family == "tiny":
        folder = make_tiny_backbone(tempfile.mkdtemp(prefix="bench_tiny_"), text_encoder="clip")
        return load_backbone(folder, device=device), (32, 32)
    parts = family_shaped_components(family, width_divisor=width_divisor)
    bb = Backbone(**parts, name=f"{family}-shaped-random", source="config", fingerprint="random")
    return bb.to(device), (size, size)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every millisecond in a thread (tracemalloc misses torch's allocations)."""

    def __enter__(self):
        self.peak = self.start = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def run_once(bb, size, steps, capture, device):
    import torch

    from datasetdm.backbone.capture import generate

    t0, c0 = time.perf_counter(), time.process_time()
    images, hc = generate(bb, [PROMPT], [1234], num_inference_steps=steps, guidance_scale=7.5,
                          height=size[0], width=size[1], capture=capture)
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0, time.process_time() - c0), images, hc


def forward_times(bb, size, args) -> dict:
    """The one place the two modes differ, alone: the UNet forward of the captured step (CFG batch
    of 2, conditional half recorded, hypercolumns assembled) against the same forward plain,
    alternated ``--forward-repeats`` times. Its overhead is what capture adds to a generation of
    any length, without the noise of the steps that are identical in both modes."""
    import torch

    from datasetdm.backbone.capture import capture_hypercolumns

    f = bb.vae_scale_factor
    emb = bb.embed_prompts([PROMPT] * 2)
    conditioning = bb.unet_conditioning(emb, size)
    x = torch.randn((2, bb.unet.config.in_channels, size[0] // f, size[1] // f),
                    generator=torch.Generator().manual_seed(0)).to(bb.device, bb.dtype)
    t = torch.tensor(bb.scheduler.config.num_train_timesteps // 2, device=bb.device)

    def plain():
        bb.unet(x, t, **conditioning)

    def captured():
        with capture_hypercolumns(bb.unet, x.shape[-2:]) as rec:
            with rec.capturing(slice(1, 2)):
                bb.unet(x, t, **conditioning)
            rec.hypercolumns(emb.input_ids[1:], [PROMPT], int(t))

    out = {"forward_plain_cpu": [], "forward_capture_cpu": [], "forward_plain": [], "forward_capture": []}
    with torch.no_grad():
        captured()  # warm-up
        for r in range(args.forward_repeats):
            for name, fn in (("plain", plain), ("capture", captured)) if r % 2 == 0 else (("capture", captured), ("plain", plain)):
                w, c = time.perf_counter(), time.process_time()
                fn()
                if args.device != "cpu":
                    torch.cuda.synchronize()
                out[f"forward_{name}"].append(time.perf_counter() - w)
                out[f"forward_{name}_cpu"].append(time.process_time() - c)
    return out


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bb, size = build(args.model, args.size, args.width_divisor, args.device)
    if args.worker == "time":
        run_once(bb, size, args.steps, True, args.device)  # warm-up (allocator, oneDNN kernels)
        times = {"plain": [], "capture": [], "plain_cpu": [], "capture_cpu": []}
        for r in range(args.repeats):
            # ABBA order: a slow drift of the shared machine's load does not favour either mode
            for mode in ("plain", "capture") if r % 2 == 0 else ("capture", "plain"):
                (wall, cpu), _, _ = run_once(bb, size, args.steps, mode == "capture", args.device)
                times[mode].append(wall)
                times[f"{mode}_cpu"].append(cpu)
        times.update(forward_times(bb, size, args))
        return times
    capture = args.worker == "mem-capture"
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as m:
        _, images, hc = run_once(bb, size, args.steps, capture, args.device)
    out = {"rss_start": m.start, "rss_peak": m.peak, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if args.device != "cpu":
        out.update(gpu_start=base, gpu_peak=torch.cuda.max_memory_allocated())
    if hc is not None:
        out["captured"] = {"features": [list(f.shape) for f in hc.features],
                           "cross_attention": [list(a.shape) for a in hc.cross_attention]}
    out["model"] = {
        "unet_params_m": round(sum(p.numel() for p in bb.unet.parameters()) / 1e6, 1),
        "text_params_m": round(sum(p.numel() for m in (bb.text_encoder, bb.text_encoder_2) if m is not None
                                   for p in m.parameters()) / 1e6, 1),
        "native_size": list(bb.native_size), "image_size": list(size), "prediction_type": bb.prediction_type,
        "unet_resolutions": len(bb.unet.config.down_block_types), "text_width": bb.text_width,
    }
    return out


def sub(args, model, what) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--model", model, "--steps", str(args.steps[model]),
           "--repeats", str(args.repeats[model]), "--threads", str(args.threads), "--device", args.device,
           "--size", str(args.size), "--width-divisor", str(args.width_divisors[model]),
           "--forward-repeats", str(args.forward_repeats)]
    env = dict(os.environ)
    if what.startswith("mem") and args.device == "cpu":
        # glibc keeps freed blocks of a growing heap (its mmap threshold rises with each large
        # free), so a process's RSS peak depends on the order of its allocations: runs differed by
        # 100 MiB with identical work. A fixed threshold returns every block >= 64 KiB to the OS on
        # free, so peak RSS follows the peak of live tensors (weights + activations)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.stderr.write(res.stderr[-3000:])
        raise SystemExit(f"worker {model}/{what} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_model(args, model) -> dict:
    mib = 1 << 20
    times = sub(args, model, "time")
    mem = {mode: sub(args, model, f"mem-{mode}") for mode in ("plain", "capture")}
    tp, tc = min(times["plain"]), min(times["capture"])
    cpu_p, cpu_c = min(times["plain_cpu"]), min(times["capture_cpu"])
    # CPU time is the work itself when one thread does it; with more threads (or on a GPU) wall time
    use_cpu_time = args.device == "cpu" and args.threads == 1
    ratio = cpu_c / cpu_p if use_cpu_time else tc / tp
    suffix = "_cpu" if use_cpu_time else ""
    fp, fc = min(times[f"forward_plain{suffix}"]), min(times[f"forward_capture{suffix}"])
    key = "gpu" if args.device != "cpu" else "rss"
    pp, pc = mem["plain"][f"{key}_peak"], mem["capture"][f"{key}_peak"]
    wp = pp - mem["plain"][f"{key}_start"]
    wc = pc - mem["capture"][f"{key}_start"]
    info = mem["capture"]["model"]
    r = {
        "steps": args.steps[model], "repeats": args.repeats[model], "width_divisor": args.width_divisors[model],
        **info,
        "time_measure": "process CPU time, 1 thread" if use_cpu_time else "wall time",
        "time_ratio": round(ratio, 4), "wall_time_ratio": round(tc / tp, 4),
        "time_plain_s": round(tp, 3), "time_capture_s": round(tc, 3),
        "cpu_time_plain_s": round(cpu_p, 3), "cpu_time_capture_s": round(cpu_c, 3),
        "forward_plain_s": round(fp, 3), "forward_capture_s": round(fc, 3), "forward_ratio": round(fc / fp, 4),
        "forward_repeats": args.forward_repeats,
        "peak_plain_mib": round(pp / mib, 1), "peak_capture_mib": round(pc / mib, 1),
        "memory_ratio": round(pc / pp, 4),
        "working_plain_mib": round(wp / mib, 1), "working_capture_mib": round(wc / mib, 1),
        "working_memory_ratio": round(wc / max(wp, 1), 4),
        "captured": mem["capture"].get("captured"),
    }
    print(f"[{model}] {info['image_size'][0]} px (native {info['native_size'][0]}), width / {args.width_divisors[model]} "
          f"(UNet {info['unet_params_m']} M, text {info['text_params_m']} M parameters), {args.steps[model]} steps, "
          f"batch 1, CFG 7.5, {args.device}, threads={args.threads or 'default'}")
    print(f"  time  ratio {r['time_ratio']:.3f} ({r['time_measure']}; min of {args.repeats[model]} each): "
          f"CPU plain {cpu_p:.3f}s capture {cpu_c:.3f}s; wall plain {tp:.3f}s capture {tc:.3f}s ratio {tc / tp:.3f} "
          f"(all wall plain {[round(t, 2) for t in times['plain']]}, capture {[round(t, 2) for t in times['capture']]})")
    print(f"  captured step's UNet forward alone: plain {fp:.3f}s capture {fc:.3f}s ratio {fc / fp:.3f} "
          f"(min of {args.forward_repeats} each, alternated)")
    print(f"  peak {key.upper()} plain {pp / mib:.0f} MiB  capture {pc / mib:.0f} MiB  ratio {r['memory_ratio']:.3f}; "
          f"above pre-run: plain {wp / mib:.1f} MiB  capture {wc / mib:.1f} MiB  ratio {r['working_memory_ratio']:.3f}")
    print(f"  captured {r['captured']}")
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd15", help=f"comma-separated, from {', '.join(FAMILIES)}")
    p.add_argument("--size", type=int, default=256, help="image side in px (not for tiny, which runs at 32)")
    p.add_argument("--width-divisor", type=int, default=None,
                   help="divide UNet and text-encoder widths by this (default: sd15 1, sd21 1, sdxl 2)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 2; tiny 10)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per mode (default: 4; tiny 30)")
    p.add_argument("--forward-repeats", type=int, default=6, help="timed captured-step forwards per mode")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default); 1 keeps timings stable on shared cores")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    models = [m for m in args.family.split(",") if m]
    unknown = [m for m in models if m not in FAMILIES]
    if unknown or not models:
        p.error(f"--family {args.family!r}: choose from {', '.join(FAMILIES)}")
    if args.size % 64:
        p.error(f"--size {args.size}: must be a multiple of 64 (VAE factor 8 x the UNet's downsamplings)")
    args.steps = {m: args.steps or (10 if m == "tiny" else 2) for m in models}
    args.repeats = {m: args.repeats or (30 if m == "tiny" else 4) for m in models}
    args.width_divisors = {m: args.width_divisor or DEFAULT_WIDTH_DIVISOR[m] for m in models}
    results = {m: bench_model(args, m) for m in models}
    worst = lambda key: max(r[key] for r in results.values())  # noqa: E731
    print(json.dumps({
        "bench": "capture_overhead", "families": models, "device": args.device,
        "time_ratio": worst("time_ratio"), "memory_ratio": worst("memory_ratio"),
        "working_memory_ratio": worst("working_memory_ratio"),
        "memory_measure": "peak RSS sampled every 1 ms" if args.device == "cpu" else "torch.cuda.max_memory_allocated",
        **{m: {k: v for k, v in r.items() if k != "captured"} for m, r in results.items()},
    }))


if __name__ == "__main__":
    main()
