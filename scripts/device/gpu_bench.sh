#!/usr/bin/env bash
# Issue 19's GPU bench on a lent GPU machine (the workplace's `device` tool), in one call of ≤ 8 min:
# SD 1.5's architecture (random weights) at 512 px, 25 steps, batch 8, fp16 — annotated generation
# (semantic + depth decoders) against diffusers' StableDiffusionPipeline on the same components
# (time ratio, peak-memory ratio, samples/s), then decoder training on cached features against
# recomputing the UNet each step (bench/decoder_training.py --sd15-shaped).
#
# Here, first:   .venv/bin/python scripts/device/pack_gpu_bench.py   (.devpack-bench/, ~8 MiB, git-ignored:
#                the wheels the device's python lacks — diffusers, pydantic, pycocotools — and CLIP's vocabulary)
# Device call:   carry [".devpack-bench"], timeout_s 540, command: bash scripts/device/gpu_bench.sh
# Back here:     <files_at>/gpu_bench.json (last line of the bench) and gpu_bench.log
# Smoke test on the CPU (uses .venv, no pack):  bash scripts/device/gpu_bench.sh --device cpu --tiny
#
# Any arguments go to bench/gpu_generation.py. Budget: GEN_S seconds for the generation part and
# TRAIN_S for the training part (each under `timeout`, so one part running long still leaves the
# other's figures; if the training part times out, rerun with a smaller TRAIN_ITERATIONS); the
# JSON lines of both are in the log either way. Run on an H200 in session 17 (docs/gpu-bench.json).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
GEN_S=${GEN_S:-150}
TRAIN_S=${TRAIN_S:-300}
TRAIN_ITERATIONS=${TRAIN_ITERATIONS:-400}  # decoder steps of the cached run (the recompute run stops at its target)
start=$(date +%s)
exec > >(tee "$OUT/gpu_bench.log") 2>&1

if [ -d .devpack-bench/wheels ]; then  # the device machine: its own python + the carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devpack-bench/wheels/*.whl || exit 1
  cp -r .devpack-bench/site/. /tmp/site/  # open_clip/bpe_simple_vocab_16e6.txt.gz: the CLIP tokenizer's vocabulary
  export PYTHONPATH="/tmp/site:$PWD/src"
  PY=python3
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  echo "no .devpack-bench/ (run scripts/device/pack_gpu_bench.py here first) and no .venv"; exit 1
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

tiny=0
for a in "$@"; do [ "$a" = --tiny ] && tiny=1; done
if [ $tiny = 1 ]; then  # smoke test: small training run, short recompute budget
  train_args=(--train-images 4 --train-val 4 --train-views 2 --train-iterations 6 --train-val-every 3
              --max-recompute-seconds 20 --batch 2 --steps 3 --repeats 1)
else
  # session 17 on an H200: 100 images / 50 val / 600 its did not finish in 330 s; this size took 220 s
  train_args=(--train-images 50 --train-val 20 --train-views 4 --train-iterations "$TRAIN_ITERATIONS"
              --train-val-every 50 --max-recompute-seconds 60)
fi

timeout "$GEN_S" $PY bench/gpu_generation.py "${train_args[@]}" "$@" | tee "$OUT/generation.txt"
echo "generation part: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start ))s"
timeout "$TRAIN_S" $PY bench/gpu_generation.py --skip-generation --training "${train_args[@]}" "$@" | tee "$OUT/training.txt"
echo "training part: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start ))s"

# one JSON: the machine, the generation figures and the training figures
$PY - "$OUT" <<'EOF' | tee "$OUT/gpu_bench.json"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {}
for name in ("generation.txt", "training.txt"):
    lines = [l for l in (out / name).read_text().splitlines() if l.startswith("{")] if (out / name).exists() else []
    if lines:
        merged.update({k: v for k, v in json.loads(lines[-1]).items() if v is not None})
print(json.dumps(merged))
EOF
echo "done in $(( $(date +%s) - start ))s"
