#!/usr/bin/env bash
# SDXL-Lightning on the bundled mini model: the progressive adversarial LoRAs, the full-UNet
# students, and the ablations (MSE-only progression, MSE kept beside the adversarial term, no
# schedule fix, no unconditional fine-tune, the full-network fine-tune at lr 1e-5), each
# evaluated into benchmarks/eval beside the other methods. The commands
# behind the Lightning rows of benchmarks/eval and the lightning-mini files of
# benchmarks/loras and benchmarks/unets. Rerun to continue after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
H=.venv/bin/hypersd
OUT=${OUT:-benchmarks/eval}
L=benchmarks/loras
U=benchmarks/unets
REWARDS="--reward mini-adherence --reward mini-structure"
A=outputs/lightning-ablations  # what stays out of the repository: ablations, the 2-8 step UNets
mkdir -p "$A"

# export_lora RUN STAGE PATH: the stage's LoRA as PATH.safetensors (fp16)
export_lora() { $H lora convert "runs/distill/$1/$2.safetensors" "$3.safetensors" --dtype fp16; }

# export_unet RUN STAGE PATH: the stage's original-layout UNet file as PATH.safetensors (fp16)
export_unet() {
    .venv/bin/python -c "import sys; from safetensors import safe_open; from safetensors.torch import save_file
with safe_open(sys.argv[1], 'pt') as f: save_file({k: f.get_tensor(k).half() for k in f.keys()}, sys.argv[2], f.metadata())" \
        "runs/distill/$1/$2.safetensors" "$3.safetensors"
}

# evaluate LABEL FLAG PREFIX STEPS: one row per step count N, each with its own N-step file
evaluate() {
    local label=$1 flag=$2 prefix=$3 steps=$4 args=()
    for n in ${steps//,/ }; do args+=("$flag" "$n=$prefix-$n.safetensors"); done
    $H eval "${args[@]}" --recipe lightning --steps "$steps" --label "$label" --out "$OUT" $REWARDS
}

$H distill lightning-mini
export_lora lightning-mini 0-pd-128to32 "$L/lightning-mini-32"
for stage in 1-lightning-8 2-lightning-4 3-lightning-2 4-lightning-1; do
    export_lora lightning-mini "$stage" "$L/lightning-mini-${stage##*-}"
done
evaluate "SDXL-Lightning N-step LoRAs" --step-lora "$L/lightning-mini" 1,2,4,8

$H distill lightning-mini-mse
for stage in 1-pd-8 2-pd-4 3-pd-2 4-pd-1; do
    export_lora lightning-mini-mse "$stage" "$A/mse-${stage##*-}"
done
evaluate "Progressive distillation N-step LoRAs (MSE only)" --step-lora "$A/mse" 1,2,4,8

$H distill lightning-mini-unet
for n in 8 4 2 1; do export_unet lightning-mini-unet "unet-$n" "$A/unet-$n"; done
evaluate "SDXL-Lightning N-step UNets (full network)" --step-unet "$A/unet" 1,2,4,8
# only the 1-step UNet is committed: at 2-8 steps the full networks are level with the LoRAs
mkdir -p "$U"
cp "$A/unet-1.safetensors" "$U/lightning-mini-unet-1.safetensors"

$H distill lightning-mini-ablations
for kind in no-fix cond; do
    for n in 2 1; do export_lora lightning-mini-ablations "$kind-$n" "$A/$kind-$n"; done
done
evaluate "SDXL-Lightning LoRAs, no schedule fix" --step-lora "$A/no-fix" 1,2
evaluate "SDXL-Lightning LoRAs, conditional discriminator only" --step-lora "$A/cond" 1,2

$H distill lightning-mini-mixed
for stage in 1-mixed-8 2-mixed-4 3-mixed-2 4-mixed-1; do
    export_lora lightning-mini-mixed "$stage" "$A/mixed-${stage##*-}"
done
evaluate "SDXL-Lightning N-step LoRAs, MSE kept beside the adversarial term" --step-lora "$A/mixed" 1,2,4,8

# the full-network fine-tune at ten times the recipe's learning rate
lr=(); for i in 0 1 2 3; do lr+=(--set "stages.$i.lr=1e-5"); done
$H distill lightning-mini-unet --set output_dir=runs/distill/lightning-mini-unet-lr1e-5 "${lr[@]}"
for n in 8 4 2 1; do export_unet lightning-mini-unet-lr1e-5 "unet-$n" "$A/unet-lr1e-5-$n"; done
evaluate "SDXL-Lightning N-step UNets (full network, lr 1e-5)" --step-unet "$A/unet-lr1e-5" 1,2,4,8
