#!/usr/bin/env bash
# The mini flow model's students against their teacher (benchmarks/eval-flow): the teacher at
# 25 steps and undistilled at 1/2/4/8; TSCD (hyper-sd-mini-flow) distilled from it, its last
# stage at 1/2/4/8 and its stages k = 8, 4, 2 as N-step LoRAs at their own N; DMD2
# (dmd2-mini-flow) at 1/2/4/8; TSCD with the adversarial term (hyper-sd-mini-flow-adv) at
# 1/2/4/8. The students' LoRAs are kept in fp16 in benchmarks/loras.
#   MODEL=path/to/exported-flow-model bash scripts/flow_mini.sh   # default: the bundled mini-flow
# Rerun to continue after an interruption: distillation resumes, evaluation reuses its images.
# Pass parts' names (teacher, tscd, dmd2, tscd-adv) to run only those.
set -euo pipefail
cd "$(dirname "$0")/.."
HYPERSD=.venv/bin/hypersd
MODEL=${MODEL:-mini-flow}
OUT=${OUT:-benchmarks/eval-flow}
RUNS=${RUNS:-runs/distill}
LORAS=${LORAS:-benchmarks/loras}
PARTS=${*:-teacher tscd dmd2 tscd-adv}
EVAL=($HYPERSD eval --model "$MODEL" --out "$OUT")
mkdir -p "$LORAS"

last_lora() {  # the last stage's LoRA of a run, in fp16 under $LORAS/$2.safetensors
    local last
    last=$(ls "$1"/*.safetensors | sort | tail -1)
    $HYPERSD lora convert "$last" "$LORAS/$2.safetensors" --dtype fp16 >/dev/null
    echo "$LORAS/$2.safetensors"
}

if [[ " $PARTS " == *" teacher "* ]]; then
    "${EVAL[@]}" --recipe mini-flow --steps 25 --label "flow teacher (CFG 3)"
    "${EVAL[@]}" --recipe mini-flow --steps 1,2,4,8 --label "flow teacher, undistilled (CFG 3)"
fi
if [[ " $PARTS " == *" tscd "* ]]; then
    run=$RUNS/hyper-sd-mini-flow
    $HYPERSD distill hyper-sd-mini-flow --set "model=$MODEL" --set "output_dir=$run"
    "${EVAL[@]}" --recipe flow-student --lora "$(last_lora "$run" hyper-sd-mini-flow)" --steps 1,2,4,8 \
        --label "TSCD 8-4-2-1 (MSE)"
    args=()
    for k in 8 4 2; do
        $HYPERSD lora convert "$run"/*-k$k.safetensors "$LORAS/hyper-sd-mini-flow-k$k.safetensors" --dtype fp16 >/dev/null
        args+=(--step-lora "$k=$LORAS/hyper-sd-mini-flow-k$k.safetensors")
    done
    "${EVAL[@]}" --recipe flow-student "${args[@]}" --steps 2,4,8 --label "TSCD N-step LoRAs (MSE)"
fi
if [[ " $PARTS " == *" tscd-adv "* ]]; then
    run=$RUNS/hyper-sd-mini-flow-adv
    $HYPERSD distill hyper-sd-mini-flow-adv --set "model=$MODEL" --set "output_dir=$run"
    "${EVAL[@]}" --recipe flow-student --lora "$(last_lora "$run" hyper-sd-mini-flow-adv)" --steps 1,2,4,8 \
        --label "TSCD 8-4-2-1 (MSE + adversarial)"
fi
if [[ " $PARTS " == *" dmd2 "* ]]; then
    run=$RUNS/dmd2-mini-flow
    $HYPERSD distill dmd2-mini-flow --set "model=$MODEL" --set "output_dir=$run"
    "${EVAL[@]}" --recipe flow-student --lora "$(last_lora "$run" dmd2-mini-flow)" --steps 1,2,4,8 \
        --label "DMD2 (no GAN term)"
fi
