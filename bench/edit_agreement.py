"""Editing with labels over many samples (issue 22, item 6; paper §1, Fig. 4): how well a colour
swap keeps the sample's layout, with prompt-to-prompt attention control and without it.

For each of the first ``--n`` kept samples of a decoder-labelled run whose prompt names a world
colour, the first colour word is swapped for the next colour of a fixed list (``red=blue``,
``blue=green`` …) and the sample is regenerated from its seed by ``generation.edit.edit_sample``
twice: with the prompt-to-prompt defaults (cross-attention injected for 80% of the steps,
self-attention for 40%) and with no injection (``--cross-steps 0 --self-steps 0``: the edited
prompt alone from the same seed). The figure is the semantic agreement of the edited sample's
labels with the original's (share of pixels with the same class, ignore left out), as
`datasetdm edit` writes it in ``edit.json``.

Without ``--run``, the bench makes what it needs under ``--out`` (resumable: each step is
skipped when its output exists): the 100 world train-split scenes, a semantic decoder trained
with `datasetdm train`'s defaults, and ``--generate`` samples generated with it from world
val-split captions (which name colours).

    python bench/edit_agreement.py --out runs/edit --n 50          # ~25 min on 2 CPU cores
    python bench/edit_agreement.py --run RUN --decoder CKPT --n 50

The last printed line is JSON: per mode (``p2p``, ``plain``) the mean and median agreement and the
share of edits at ≥ 0.8 (the slow test's bar), and the per-sample records.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = {"p2p": (0.8, 0.4), "plain": (0.0, 0.0)}  # (cross, self) fractions of the steps


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "from datasetdm.cli import main; main()", *args], check=True,
                   stdout=subprocess.DEVNULL)


def make_run(out: Path, n_generate: int, seed: int) -> tuple[Path, Path]:
    """(run, decoder) under ``out``: world scenes, a semantic decoder, a decoder-labelled run."""
    train, decoder, run = out / "train", out / "decoders" / "semantic", out / "run"
    if not (train / "categories.json").exists():
        cli("world", "render", "--split", "train", "--seed", "0", "--n", "100", "--out", str(train))
    if not (decoder / "config.json").exists():
        print("training the semantic decoder (train defaults) ...", flush=True)
        cli("train", "--data", str(train), "--task", "semantic", "--out", str(decoder), "--no-progress")
    if not _finished(run, n_generate):  # an interrupted run resumes
        from datasetdm.world.folders import world_prompt_file

        prompts = world_prompt_file(out / f"prompts-{n_generate}.txt", n_generate)  # captions: they name colours
        print(f"generating {n_generate} samples ...", flush=True)
        cli("generate", "--out", str(run), "--decoder", str(decoder), "--n", str(n_generate), "--seed", str(seed),
            "--prompts", str(prompts))
    return run, decoder


def _finished(run: Path, n: int) -> bool:
    from datasetdm.errors import DatasetdmError
    from datasetdm.formats.shards import read_manifest

    try:
        return len(read_manifest(run)) >= n
    except DatasetdmError:  # no manifest yet
        return False


def colour_swap(prompt: str, colours: list[str]) -> str | None:
    """``OLD=NEW`` for the prompt's first colour word (NEW: the next colour of the list), or None."""
    words = re.findall(r"[a-z]+", prompt.lower())
    for w in words:
        if w in colours:
            return f"{w}={colours[(colours.index(w) + 1) % len(colours)]}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/edit"), help="work folder (without --run)")
    ap.add_argument("--run", type=Path, help="a decoder-labelled generate run (default: made under --out)")
    ap.add_argument("--decoder", type=Path, action="append", help="the run's decoder checkpoints, in its order")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--n", type=int, default=50, help="edits (samples whose prompt names a colour)")
    ap.add_argument("--generate", type=int, default=100, help="samples to generate without --run")
    ap.add_argument("--seed", type=int, default=1, help="generation seed without --run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from datasetdm.formats.shards import read_manifest
    from datasetdm.generation.edit import edit_sample, parse_swaps
    from datasetdm.world.render import COLOURS

    torch.set_num_threads(args.threads)
    if args.run is None:
        args.out.mkdir(parents=True, exist_ok=True)
        args.run, decoder = make_run(args.out, args.generate, args.seed)
        args.decoder = [decoder]
    if not args.decoder:
        sys.exit("--run needs the run's --decoder checkpoints")
    colours = list(COLOURS)
    rows = [r for r in read_manifest(args.run).select(["id", "prompt", "kept"]).to_pylist() if r["kept"]]
    chosen = [(r["id"], s) for r in rows if (s := colour_swap(r["prompt"], colours)) is not None][: args.n]
    if not chosen:
        sys.exit(f"{args.run}: no kept sample names a colour ({', '.join(colours)})")
    from datasetdm.backbone.loader import load_backbone

    backbone = load_backbone(args.backbone)  # once for every edit
    records = []
    t0 = time.perf_counter()
    for k, (sample_id, swap) in enumerate(chosen):
        record = {"sample": sample_id, "swap": swap}
        for mode, (cross, self_) in MODES.items():
            result = edit_sample(args.run, sample_id, parse_swaps([swap]), args.decoder, backbone=backbone,
                                 cross_fraction=cross, self_fraction=self_)
            record[mode] = result.record["semantic_agreement"]
            record[f"{mode}_image_mean_abs_diff"] = round(result.record["edited_image_mean_abs_diff"], 2)
            record["source_semantic_agreement"] = result.record["source_semantic_agreement"]
        records.append(record)
        print(f"{k + 1}/{len(chosen)} sample {sample_id} {swap}: p2p {record['p2p']:.3f}, plain {record['plain']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    summary = {}
    print(f"\n{'mode':<8}{'mean':>8}{'median':>8}{'>= 0.8':>8}{'image diff':>12}")
    for mode in MODES:
        a = np.array([r[mode] for r in records if r[mode] is not None], float)
        d = np.array([r[f"{mode}_image_mean_abs_diff"] for r in records], float)
        summary[mode] = {"mean": round(float(a.mean()), 4), "median": round(float(np.median(a)), 4),
                         "share_at_least_0.8": round(float((a >= 0.8).mean()), 4),
                         "image_mean_abs_diff": round(float(d.mean()), 2), "n": int(a.size)}
        s = summary[mode]
        print(f"{mode:<8}{s['mean']:>8.3f}{s['median']:>8.3f}{s['share_at_least_0.8']:>8.2f}{s['image_mean_abs_diff']:>12.1f}")
    again = [r["source_semantic_agreement"] for r in records if r["source_semantic_agreement"] is not None]
    print(json.dumps({"bench": "edit_agreement", "run": str(args.run), "decoders": [str(d) for d in args.decoder],
                      "n": len(records), "modes": summary,
                      "source_reproduction_agreement": round(float(np.mean(again)), 4) if again else None,
                      "seconds": round(time.perf_counter() - t0, 1), "records": records}))


if __name__ == "__main__":
    main()
