#!/usr/bin/env bash
# Continue the embedded backbone on a lent GPU machine (the workplace's `device` tool).
#
# Here, first:   .venv/bin/python scripts/device/pack.py --parts   (.devpack/1/, .devpack/2/, ...: ~28 MiB)
# Device calls:  carry [".devpack/1"], command `true`; at once (the machine stays warm ~30 s) carry
#                [".devpack/2"] ... and in the last one, timeout_s 590, command:
#                BUDGET_S=400 CALL_S=570 bash scripts/device/train_backbone_gpu.sh
#                (session 6 ran it in one call with an unsplit .devpack/, when the tree was 36 MiB)
# Back here:     cat <files_at>/export.tar.part-* | tar xf - -C runs/gpu   -> runs/gpu/export
#
# The UNet stage gets BUDGET_S seconds: the step time is measured first and --unet-steps is set
# from it, so the cosine schedule ends inside the call. Everything else is `datasetdm backbone
# train` itself (--device cuda): world rendering on every core, encoders and UNet on the GPU.
#
# MODE=continue (default): train the export FROM further (--from-export; the cosine is stretched
#   from its step), e.g. the committed backbone v2.
# MODE=init: a new run warm-started from FROM's weights on the current world (--init-from: the
#   VAE decoder is fine-tuned on the CPU cores, then the UNet trains from step 0 with a full
#   schedule) — how backbone v2 was started from v1 on 2 CPU cores, here with a GPU's batch.
set -euo pipefail
: "${OUT:?OUT must name the folder whose files come back}"
BUDGET_S=${BUDGET_S:-400}
CALL_S=${CALL_S:-570}   # the call's own limit (the tool's timeout_s) less a little: outputs must be copied by then
BATCH=${BATCH:-256}
FROM=${FROM:-src/datasetdm/assets/embedded}
MODE=${MODE:-continue}
RUN=${RUN:-/tmp/run}
start=$(date +%s)
exec > >(tee "$OUT/device.log") 2>&1

if [ ! -d .devpack/minilm ]; then  # carried in parts, one call each
  cat .devpack/*/devpack.tar.part-* | tar xf - -C .devpack
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devpack/wheels/*.whl
python3 scripts/device/unpack_minilm.py .devpack/minilm /tmp/site
export PYTHONPATH="/tmp/site:$PWD/src" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

step_s=$(python3 scripts/device/time_step.py --batch "$BATCH")
if [ "$MODE" = init ]; then
  from_step=0
  seed=(--init-from "$FROM")
  BUDGET_S=$((BUDGET_S - 150))  # the VAE decoder fine-tune runs on the CPU cores first
else
  from_step=$(python3 -c "import json; print(json.load(open('$FROM/training.json'))['step'])")
  seed=(--from-export "$FROM")
fi
steps=$(python3 -c "print($from_step + int($BUDGET_S / ($step_s * 1.1)) // 500 * 500)")
echo "unet step ${step_s}s at batch $BATCH -> $MODE: train from $from_step to $steps ($(( $(date +%s) - start ))s so far)"

# timeout: a slower stage must not eat the call; the last export (every 1000 steps) still comes back
timeout $((CALL_S - ($(date +%s) - start) - 20)) python3 -m datasetdm.cli backbone train --run "$RUN" "${seed[@]}" \
  --unet-steps "$steps" --unet-batch "$BATCH" --device cuda --threads "$(nproc)" || echo "train exited with $?"

cp "$RUN/train.log" "$OUT/train.log"
tar cf - -C "$RUN" export | split -b 15m - "$OUT/export.tar.part-"
echo "done in $(( $(date +%s) - start ))s"
