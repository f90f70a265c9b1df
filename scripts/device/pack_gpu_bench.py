"""Pack what a lent GPU machine lacks for ``scripts/device/gpu_bench.sh`` into ``.devpack-bench/``.

That machine's python (3.12, torch, transformers, safetensors, torchmetrics, pyarrow, typer, rich)
has no diffusers, pydantic or pycocotools, and no open_clip, whose BPE file the SD-shaped test
model's CLIP tokenizer is rebuilt from (``testing.write_clip_tokenizer_files``). This downloads
their cp312 manylinux wheels (the versions this .venv has) and copies the one vocabulary file into
``site/open_clip/`` (a namespace package: ``package_dir("open_clip")`` finds it without the rest of
open_clip). The folder is git-ignored; carry it in the device call.

    .venv/bin/python scripts/device/pack_gpu_bench.py
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
from pathlib import Path

# what the bench imports that the device image lacks (KINDS.md's package list), at this .venv's versions
PACKAGES = ["diffusers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "pycocotools"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".devpack-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    pins = [f"{name}=={md.version(name)}" for name in PACKAGES]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(args.out / "wheels"), *pins],
                   check=True)
    from datasetdm.backbone.loader import package_dir

    vocab = package_dir("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    (args.out / "site" / "open_clip").mkdir(parents=True)
    shutil.copy(vocab, args.out / "site" / "open_clip" / vocab.name)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {', '.join(pins)} + {vocab.name}; {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
