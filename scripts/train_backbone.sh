#!/usr/bin/env bash
# Train (or resume) the embedded backbone in the background; log in runs/backbone/nohup.log.
# Stages are resumable: run this again after a kill or on a new session and it goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/backbone
OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 nohup .venv/bin/datasetdm backbone train --run runs/backbone \
  >> runs/backbone/nohup.log 2>&1 &
echo "training in background, pid $!; tail -f runs/backbone/train.log"
