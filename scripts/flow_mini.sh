#!/usr/bin/env bash
# The mini flow model's students against their teacher: TSCD (hyper-sd-mini-flow) distilled
# from the model, then the teacher at 25 steps, undistilled at 1/2/4/8, and the student's
# last stage at 1/2/4/8, all evaluated into one table (benchmarks/eval-flow).
#   MODEL=path/to/exported-flow-model bash scripts/flow_mini.sh   # default: the bundled mini-flow
# Rerun to continue after an interruption: distillation resumes, evaluation reuses its images.
set -euo pipefail
cd "$(dirname "$0")/.."
HYPERSD=.venv/bin/hypersd
MODEL=${MODEL:-mini-flow}
OUT=${OUT:-benchmarks/eval-flow}
RUN=${RUN:-runs/distill/hyper-sd-mini-flow}
$HYPERSD distill hyper-sd-mini-flow --set "model=$MODEL" --set "output_dir=$RUN"
$HYPERSD eval --model "$MODEL" --recipe mini-flow --steps 25 --label "flow teacher (CFG 3)" --out "$OUT"
$HYPERSD eval --model "$MODEL" --recipe mini-flow --steps 1,2,4,8 --label "flow teacher, undistilled" --out "$OUT"
$HYPERSD eval --model "$MODEL" --recipe flow-student --lora "$RUN/3-tscd-k1.safetensors" --steps 1,2,4,8 \
    --label "TSCD (MSE), flow" --out "$OUT"
