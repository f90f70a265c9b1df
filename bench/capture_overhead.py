"""Cost of hypercolumn capture: plain generation vs generation with capture.

Same components (random weights from configs, fixed seed), prompts, seeds, steps and guidance;
the only difference is ``generate(..., capture=True)`` (features + cross-attention at the last
step) against ``capture=False``. Two models: an SD-1.5-shaped one (UNet 320/640/1280/1280,
cross_attention_dim 768, CLIP-L-sized text encoder, SD VAE) at 256 px, and the tiny test model.

Time: plain and capture runs alternate (ABBA) in one process after a warm-up; the minimum of each
is compared (the machine is shared, the minimum is the least disturbed run). Capture installs its
processors and hooks only around the captured forward, so the other steps cost exactly the same.
Memory: each mode runs once in a fresh subprocess; peak resident set size (RSS, read from
/proc/self/statm every millisecond by a thread, and ru_maxrss) during generation, with glibc's
mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS. ``memory_ratio``
compares the process peak; ``working_memory_ratio`` compares the peak above the RSS just before
generation (weights excluded), the stricter figure.

    python bench/capture_overhead.py                 # both models
    python bench/capture_overhead.py --models tiny   # seconds

The last printed line is JSON with ``time_ratio`` and ``memory_ratio`` (of the SD-1.5 shape
when it ran, else of the tiny model).
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


def build(model: str, device: str):
    from datasetdm.backbone.loader import Backbone, load_backbone
    from datasetdm.testing import make_tiny_backbone, sd15_shaped_components

    if model == "tiny":
        folder = make_tiny_backbone(tempfile.mkdtemp(prefix="bench_tiny_"), text_encoder="clip")
        return load_backbone(folder, device=device), (32, 32)

    # SD 1.5's configs, random weights
    bb = Backbone(**sd15_shaped_components(512), name="sd15-shaped-random", source="config", fingerprint="random")
    return bb.to(device), (256, 256)


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

    t0 = time.perf_counter()
    images, hc = generate(bb, [PROMPT], [1234], num_inference_steps=steps, guidance_scale=7.5,
                          height=size[0], width=size[1], capture=capture)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, images, hc


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bb, size = build(args.model, args.device)
    if args.worker == "time":
        run_once(bb, size, args.steps, True, args.device)  # warm-up (allocator, oneDNN kernels)
        times = {"plain": [], "capture": []}
        for r in range(args.repeats):
            # ABBA order: a slow drift of the shared machine's load does not favour either mode
            for mode in ("plain", "capture") if r % 2 == 0 else ("capture", "plain"):
                dt, _, _ = run_once(bb, size, args.steps, mode == "capture", args.device)
                times[mode].append(dt)
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
    return out


def sub(args, model, what) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--model", model, "--steps", str(args.steps[model]),
           "--repeats", str(args.repeats[model]), "--threads", str(args.threads), "--device", args.device]
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
    key = "gpu" if args.device != "cpu" else "rss"
    pp, pc = mem["plain"][f"{key}_peak"], mem["capture"][f"{key}_peak"]
    wp = pp - mem["plain"][f"{key}_start"]
    wc = pc - mem["capture"][f"{key}_start"]
    r = {
        "steps": args.steps[model], "repeats": args.repeats[model],
        "time_plain_s": round(tp, 3), "time_capture_s": round(tc, 3), "time_ratio": round(tc / tp, 4),
        "peak_plain_mib": round(pp / mib, 1), "peak_capture_mib": round(pc / mib, 1),
        "memory_ratio": round(pc / pp, 4),
        "working_plain_mib": round(wp / mib, 1), "working_capture_mib": round(wc / mib, 1),
        "working_memory_ratio": round(wc / max(wp, 1), 4),
        "captured": mem["capture"].get("captured"),
    }
    print(f"[{model}] {args.steps[model]} steps, batch 1, CFG 7.5, {args.device}, threads={args.threads or 'default'}")
    print(f"  time  plain {tp:.3f}s  capture {tc:.3f}s  ratio {r['time_ratio']:.3f}  "
          f"(min of {args.repeats[model]}; all plain {[round(t, 2) for t in times['plain']]}, "
          f"capture {[round(t, 2) for t in times['capture']]})")
    print(f"  peak {key.upper()} plain {pp / mib:.0f} MiB  capture {pc / mib:.0f} MiB  ratio {r['memory_ratio']:.3f}; "
          f"above pre-run: plain {wp / mib:.1f} MiB  capture {wc / mib:.1f} MiB  ratio {r['working_memory_ratio']:.3f}")
    print(f"  captured {r['captured']}")
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,sd15")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: sd15 2, tiny 10)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per mode (default: sd15 2, tiny 30)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default); 1 keeps timings stable on shared cores")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    models = [m for m in args.models.split(",") if m]
    args.steps = {m: args.steps or {"sd15": 2, "tiny": 10}[m] for m in models}
    args.repeats = {m: args.repeats or {"sd15": 2, "tiny": 30}[m] for m in models}
    results = {m: bench_model(args, m) for m in models}
    main_model = "sd15" if "sd15" in results else models[0]
    print(json.dumps({
        "bench": "capture_overhead", "model": main_model, "device": args.device,
        "time_ratio": results[main_model]["time_ratio"], "memory_ratio": results[main_model]["memory_ratio"],
        "working_memory_ratio": results[main_model]["working_memory_ratio"],
        "memory_measure": "peak RSS sampled every 1 ms" if args.device == "cpu" else "torch.cuda.max_memory_allocated",
        **{m: {k: v for k, v in r.items() if k != "captured"} for m, r in results.items()},
    }))


if __name__ == "__main__":
    main()
