#!/usr/bin/env bash
# Does the bundled acceleration LoRA transfer to a base fine-tuned from the teacher? The
# commands behind benchmarks/transfer: the Twemoji base (hypersd/assets/mini-twemoji) at 25
# steps, undistilled at few steps, and with the unified LoRA applied unchanged at scales 1,
# 0.75 and 0.5, each scored against emoji32-twemoji. Rerun to continue: images are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
HYPERSD=.venv/bin/hypersd
OUT=${OUT:-benchmarks/transfer}
BASE=${BASE:-hypersd/assets/mini-twemoji}
LORA=hypersd/assets/loras/hyper-sd-mini-unified.safetensors
EVAL="$HYPERSD eval --model $BASE --data twemoji --out $OUT"

$EVAL --recipe teacher --steps 25 --label "Twemoji base (CFG 3)"
$EVAL --recipe teacher-trailing --steps 1,2,4,8 --label "Twemoji base, undistilled"
for scale in 1 0.75 0.5; do
    $EVAL --recipe hyper-sd-unified --lora "$LORA:$scale" --steps 1,2,4,8 \
        --label "Twemoji base + unified LoRA (scale $scale)"
done
# the same LoRA on the base it was distilled from, scored against its own (noto) data
$HYPERSD eval --out "$OUT/noto" --recipe teacher --steps 25 --label "teacher (CFG 3)"
$HYPERSD eval --out "$OUT/noto" --recipe hyper-sd-unified --lora "$LORA" --steps 1,2,4,8 \
    --label "teacher + unified LoRA (scale 1)"
