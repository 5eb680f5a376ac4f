#!/usr/bin/env bash
# Distil the bundled mini teacher with every method and evaluate each student side by side:
# the commands behind benchmarks/eval and benchmarks/loras. Rerun to continue after an
# interruption: distillation resumes from its checkpoints and evaluation reuses its images.
# Pass method names to run only those, e.g. `bash scripts/distill_mini.sh hyper-sd-mini lcm-mini`.
set -euo pipefail
cd "$(dirname "$0")/.."
HYPERSD=.venv/bin/hypersd
OUT=${OUT:-benchmarks/eval}
# the mini rewards' mean scores beside the metrics (feedback learning optimises them)
REWARDS="--reward mini-adherence --reward mini-structure"

# recipe | inference recipe | step counts | table label [| label of its N-step LoRAs]
# The last stage's LoRA is evaluated at every step count. With a fifth field, the stages
# k = 8, 4, 2 are also exported as N-step LoRAs and each is evaluated at its own N with DDIM
# trailing, the way Hyper-SD ships its 8-, 4- and 2-step LoRAs.
RUNS="hyper-sd-mini|hyper-sd-unified|1,2,4,8|Hyper-SD TSCD (MSE + adversarial)
lcm-mini|lcm|1,2,4,8|LCM
tcd-mini|tcd|1,2,4,8|TCD
pcm-mini|hyper-sd|1,2,4,8|PCM (k=4)
hyper-sd-mini-mse|hyper-sd-unified|1,2,4,8|Hyper-SD TSCD (MSE only)|Hyper-SD TSCD N-step LoRAs (MSE only)
hyper-sd-mini-cfg|tscd-cfg|2,4,8|Hyper-SD TSCD, CFG kept (k=8,4)
hyper-sd-mini-adv-small|hyper-sd-unified|1,2,4,8|Hyper-SD TSCD (MSE + adversarial / 100)
hyper-sd-mini-dmd|hyper-sd-unified|1,2,4,8|Hyper-SD TSCD (MSE only) + DMD
hyper-sd-mini-feedback|hyper-sd-unified|1,2,4,8|Hyper-SD TSCD (MSE only) + feedback
hyper-sd-mini-feedback-dmd|hyper-sd-unified|1,2,4,8|Hyper-SD TSCD (MSE only) + feedback + DMD
dmd2-mini|hyper-sd-unified|1,2,4,8|DMD2 (no GAN term)
dmd2-gan-mini|hyper-sd-unified|1,2,4,8|DMD2 (GAN term)
hyper-sd-mini-unified|hyper-sd-unified|1,2,4,8|Hyper-SD unified LoRA (complete recipe)
hyper-sd-mini-1step-unet|hyper-sdxl-1step-unet|1|Hyper-SD 1-step UNet (full network)"

while IFS='|' read -r name recipe steps label nstep; do
    if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
    echo "== $name"
    $HYPERSD distill "$name"
    last=$(ls runs/distill/"$name"/*.safetensors | grep -v kohya | sort | tail -1)
    if [ -d "${last%.safetensors}" ]; then  # a full-network student: its original-layout file
        mkdir -p benchmarks/unets
        .venv/bin/python -c "import sys, torch; from safetensors import safe_open; from safetensors.torch import save_file
with safe_open(sys.argv[1], 'pt') as f: save_file({k: f.get_tensor(k).half() for k in f.keys()}, sys.argv[2], f.metadata())" \
            "$last" "benchmarks/unets/$name.safetensors"
        $HYPERSD eval --unet "benchmarks/unets/$name.safetensors" --recipe "$recipe" \
            --steps "$steps" --label "$label" --out "$OUT" $REWARDS
        continue
    fi
    # the complete recipe's LoRA is the bundled model's default accelerator
    dest=benchmarks/loras/$name.safetensors
    [ "$name" = hyper-sd-mini-unified ] && dest=hypersd/assets/loras/$name.safetensors
    mkdir -p "$(dirname "$dest")"
    $HYPERSD lora convert "$last" "$dest" --dtype fp16
    $HYPERSD eval --lora "$dest" --recipe "$recipe" \
        --steps "$steps" --label "$label" --out "$OUT" $REWARDS
    if [ -n "${nstep:-}" ]; then
        args=()
        for k in 8 4 2; do
            stage=$(ls runs/distill/"$name"/*-k$k.safetensors | grep -v kohya | tail -1)
            $HYPERSD lora convert "$stage" "benchmarks/loras/$name-k$k.safetensors" --dtype fp16
            args+=(--step-lora "$k=benchmarks/loras/$name-k$k.safetensors")
        done
        $HYPERSD eval "${args[@]}" --recipe hyper-sd --steps 2,4,8 --label "$nstep" --out "$OUT"
    fi
done <<< "$RUNS"
