#!/usr/bin/env bash
# The commands that made the bundled mini teacher (hypersd/assets/mini-teacher).
# Both phases resume from their latest checkpoint; the UNet phase also resumes across
# machines from train-state/teacher-unet.safetensors (weights + EMA, kept in git).
# Pass e.g. --max-minutes 100 to stop (after a checkpoint) within a time budget.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/hypersd train-teacher --phase vae --steps 1800 --lr 5e-4 --batch-size 64 \
    --warmup-steps 100 --checkpoint-every 500
.venv/bin/hypersd train-teacher --phase unet --export "$@"
