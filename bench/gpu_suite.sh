#!/usr/bin/env bash
# The GPU tests and benchmarks behind bench/RESULTS.md, in stages that each fit a 10-minute command on one GPU.
#
#   bash bench/gpu_suite.sh STAGE OUT_DIR [STEPS [RECIPES]]
#
# Stages (run in this order on one machine; each writes one log per step into OUT_DIR and prints a summary):
#   fa2    GPU tests; 1.1B throughput against transformers (+ Liger) on FA2, checkpointing off/on, with a
#          profile; the bf16 loss curve of the real trainer (1.1B, 300 steps)
#   fa4    (FlashAttention-4 installed) its GPU tests and the compiled-layer tests; 1.1B throughput with FA4,
#          eager and compiled, against transformers + Liger on FA2 and FA4, checkpointing off, on and auto
#   fa4_7b (FlashAttention-4 installed) conversations of 8k-32k tokens; the Llama 2 7B shape, bf16 and fp8,
#          eager and compiled
#   long   the fp8 (tensorwise) loss curve beside fa2's bf16 one; long single conversations
#          (bench/long_context.py): 32k, 64k, 128k tokens and beyond on one GPU
#   curves the real trainer (no FlashAttention-4 needed): loss curves of the 1.1B shape, STEPS steps (300) for
#          each of RECIPES ("bf16 tensorwise")
#   trainer the real trainer: fp8 rowwise under ZeRO-3, and `--gradient-checkpointing auto` on 128k-token packs
#   lora   the fused RMSNorm's frozen-weight GPU test; LoRA and QLoRA speed (bench/lora_speed.py: 1.1B and Llama 3
#          8B shapes, ranks 16 and 64, against transformers + peft + Liger and full fine-tuning)
# The device returns at most 8 files: pack OUT_DIR into one archive when a stage writes more.
set -uo pipefail
stage=$1
out=$2
steps=${3:-300}
recipes=${4:-bf16 tensorwise}
mkdir -p "$out"
cd "$(dirname "$0")/.."

step() {  # step NAME SECONDS COMMAND...: one logged, time-limited step
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    printf '%-24s exit %-3s %4ss  %s\n' "$name" "$status" "$((SECONDS - t0))" "$(grep -v '^\s*$' "$out/$name.log" | tail -1 | cut -c1-150)"
}

case "$stage" in
fa2)
    step gpu_tests 150 python3 -m pytest -m gpu tests/kernels tests/model/test_decoder_gpu.py \
        tests/model/test_memory.py -q -p no:cacheprovider
    step throughput_1b_fa2 150 python3 bench/throughput.py --configs ochat,hf_varlen,hf_liger --steps 6 --profile \
        --tag _1b_fa2 --out "$out"
    step fp8_curve_bf16 150 python3 bench/train_run.py --work-dir /tmp/fp8run --steps 300 --out "$out/curve_bf16" \
        --conversations 6000
    ;;
fa4)
    step gpu_tests_fa4 150 python3 -m pytest -m gpu tests/kernels/test_attention.py tests/model/test_decoder_gpu.py \
        -k "attention or compiled" -q -p no:cacheprovider
    step throughput_1b_fa4 360 python3 bench/throughput.py --configs ochat,ochat_compile,hf_liger,hf_liger_fa4 \
        --ckpt off,on,auto --steps 6 --profile --tag _1b_fa4 --out "$out"
    ;;
fa4_7b)
    step throughput_long 150 python3 bench/throughput.py --configs ochat,ochat_compile,hf_liger,hf_liger_fa4 --long \
        --pack-tokens 32768 --conversations 60 --steps 4 --ckpt off --tag _long --out "$out"
    step throughput_7b 390 python3 bench/throughput.py --shape 7b \
        --configs ochat,ochat_compile,ochat_fp8,ochat_fp8_compile,hf_liger,hf_liger_fa4 --ckpt on --steps 4 \
        --conversations 600 --tag _7b --out "$out"
    ;;
long)
    for recipe in bf16 tensorwise; do
        extra=()
        [ "$recipe" != bf16 ] && extra=(-- --fp8 "$recipe")
        step "fp8_curve_$recipe" 165 python3 bench/train_run.py --work-dir /tmp/fp8run --steps 300 \
            --out "$out/curve_$recipe" --conversations 6000 "${extra[@]}"
    done
    step long_context 250 python3 bench/long_context.py --budget-s 220 --out "$out"
    ;;
curves)
    for recipe in $recipes; do
        extra=() limit=$((90 + steps / 2))
        [ "$recipe" != bf16 ] && extra=(-- --fp8 "$recipe") limit=$((120 + steps * 6 / 10))
        step "fp8_curve_$recipe" "$limit" python3 bench/train_run.py --work-dir /tmp/fp8run --steps "$steps" \
            --out "$out/curve_$recipe" --conversations $((steps * 20)) "${extra[@]}"
    done
    ;;
trainer)
    step fp8_rowwise_zero3 180 python3 bench/train_run.py --work-dir /tmp/fp8run --steps 30 \
        --out "$out/fp8_rowwise_zero3" --conversations 1000 -- --fp8 rowwise --deepspeed-config zero3
    step ckpt_auto 180 python3 bench/train_run.py --work-dir /tmp/fp8run --steps 10 --batch-max-len 131072 \
        --out "$out/ckpt_auto" --conversations 2500 -- --gradient-checkpointing auto
    ;;
lora)
    step gpu_tests_lora 120 python3 -m pytest -m gpu tests/kernels/test_rms_norm.py -q -p no:cacheprovider
    step lora_speed 450 python3 bench/lora_speed.py --out "$out"
    ;;
*)
    echo "unknown stage $stage (fa2, fa4, fa4_7b, long, curves, trainer, lora)" >&2
    exit 2
    ;;
esac
