#!/usr/bin/env bash
# The command that made the bundled mini flow model (hypersd/assets/mini-flow): rectified flow
# on the bundled teacher's VAE latents, a FLUX-shaped transformer (hypersd/models/mini_flow.py).
# It resumes from its latest checkpoint in runs/mini-flow, and on another machine from
# train-state/mini-flow.safetensors (weights + EMA). The bundled model is step 8,000 (the learning
# rate is constant after warm-up, so stopping a longer run there is the same recipe): pass e.g.
# --steps 20000 to train on, --max-minutes 100 to stop, after a checkpoint, within a time budget,
# --threads 1 to leave a core free.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/hypersd train-teacher --phase flow --run-dir runs/mini-flow --steps 8000 \
    --checkpoint-every 500 --export "$@"
