"""Pack what a lent GPU machine (the workplace's `device` tool) lacks for `backbone train --device cuda`.

That machine has torch and transformers but not diffusers, pycocotools or the MiniLM package, and
a call carries at most 64 MiB with the working tree (the committed backbone alone is 32 MiB). The
MiniLM package is 88 MB, so this keeps what the world's captions need: the six transformer layers
in fp16 and only the word-embedding rows of tokens the training captions use (+ special tokens),
with the first 77 position rows. `unpack_minilm.py` rebuilds a full-size BertModel from it on the
device (unused rows NaN, so a caption with a dropped token fails loudly instead of silently).

fp16 layers change the text states by 4e-4 on average (their mean magnitude is 0.28; measured on
256 training captions), against 5e-5 from storing the states in fp16 as the training cache does.

The pack is ~28 MiB. With the tracked tree at ~48 MiB (backbone 32 MiB + reference segmenter
16 MiB) it no longer fits one call, so ``--parts`` also writes it as a tar split into parts of
``--part-mib`` under ``.devpack/1/``, ``.devpack/2/``, ...: carry one part per call, calling again
while the machine is still warm (a carried path stays on that machine until it is given back), and
the device script reassembles them.

    .venv/bin/python scripts/device/pack.py --run runs/backbone --parts   # .devpack/ (git-ignored)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from datasetdm.embedded import model as embedded
from datasetdm.embedded.train import RECIPE

WHEELS = ["diffusers==0.42.1", "pycocotools==2.0.11"]  # the versions .venv has; cp312 for the device's python
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def training_captions(run: Path | None) -> list[str]:
    if run is not None and (run / "data.npz").exists():
        return [str(c) for c in np.load(run / "data.npz")["captions"]]
    from datasetdm.world.render import render_images_and_captions

    return render_images_and_captions("train", RECIPE.world_seed, 0, RECIPE.n_images)[1]


def pack_minilm(out: Path, captions: list[str]) -> None:
    tokenizer, _ = embedded.load_text_encoder()
    ids = tokenizer(captions + [""], padding="max_length", max_length=embedded.MAX_TOKENS,
                    truncation=True).input_ids
    kept = torch.tensor(sorted(set(np.concatenate([np.asarray(i) for i in ids]).tolist())
                               | set(tokenizer.all_special_ids)))
    src = embedded.minilm_path()
    weights = load_file(src / "model.safetensors")
    packed = {}
    for name, w in weights.items():
        if name.startswith("pooler."):  # encode_captions reads the token states, never the pooled output
            continue
        if name.endswith("word_embeddings.weight"):
            w = w[kept]
        elif name.endswith("position_embeddings.weight"):
            w = w[: embedded.MAX_TOKENS]
        packed[name] = w.half() if w.is_floating_point() else w
    packed["kept_token_ids"] = kept
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out / "pruned.safetensors"))
    for f in src.iterdir():
        if f.name in {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}:
            shutil.copy(f, out / f.name)
    print(f"minilm: {len(kept)} of {weights[next(k for k in weights if 'word_emb' in k)].shape[0]} tokens kept, "
          f"{(out / 'pruned.safetensors').stat().st_size / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/backbone"), help="reuse its data.npz captions")
    parser.add_argument("--out", type=Path, default=Path(".devpack"))
    parser.add_argument("--parts", action="store_true", help="also write the pack as a split tar, one folder a part")
    parser.add_argument("--part-mib", type=float, default=14.0)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    pack_minilm(args.out / "minilm", training_captions(args.run))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(args.out / "wheels"), *WHEELS],
                   check=True)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB")
    if args.parts:
        write_parts(args.out, int(args.part_mib * 2**20))


def write_parts(pack: Path, part_bytes: int) -> None:
    """``pack``/{minilm,wheels} as one tar cut into ``pack``/1/devpack.tar.part-001, ``pack``/2/..., and
    then the unsplit folders are removed (each call carries one numbered folder)."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("minilm", "wheels"):
            tar.add(pack / name, arcname=name)
    data = buffer.getvalue()
    for i, start in enumerate(range(0, len(data), part_bytes), 1):
        (pack / str(i)).mkdir()
        (pack / str(i) / f"devpack.tar.part-{i:03d}").write_bytes(data[start : start + part_bytes])
        print(f"{pack / str(i)}: {min(part_bytes, len(data) - start) / 2**20:.1f} MiB")
    for name in ("minilm", "wheels"):
        shutil.rmtree(pack / name)


if __name__ == "__main__":
    main()
