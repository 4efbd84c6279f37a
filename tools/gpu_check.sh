#!/usr/bin/env bash
# The GPU check: one script for a lent accelerator, sized for 12 minutes on one H100/H200-class card.
#
#   tools/gpu_check.sh [OUT]                  everything it writes goes under OUT (default: gpu_check)
#   ICOT_CHECK_SHORT=1 tools/gpu_check.sh OUT the same steps at tiny shapes and a few steps, on any machine
#                                             (tests/test_gpu_check.py runs it on the CPU)
#
# 1. The device: nvidia-smi and what torch sees (OUT/device.txt).
# 2. icot bench at GPT-2 Small shapes (12 x 768, GPT-2's vocabulary) on 4x4 multiplication: every mode's
#    examples/s and ms a token at batch 1 and batched, eager and compiled (a static KV cache and a compiled
#    one-token step, CUDA graphs), the ratios, and the training step against a hand-written loop
#    (OUT/bench.json, OUT/bench.txt).
# 3. A GPT-2-Small-shaped pipeline of every method from scratch on generated 4x4 multiplication: bf16,
#    ZeRO-2, activation checkpointing, STEPS optimizer steps a stage, each stage's tokens/s and MFU in its
#    manifest, then the evaluation of every mode (OUT/run/results.*).
# 4. The shortened Bai et al. reproduction (icot/recipes/stepwise_bai_4x4_short.yaml: 2 layers, 4 heads,
#    768 wide, from scratch): stepwise internalization against no-CoT fine-tuning on 4x4 (OUT/repro/run).
# OUT/figures.json gathers the figures (tools/gpu_check_figures.py); OUT/summary.md the device, the bench
# table and the results tables, for docs/BENCHMARKS.md.
#
# Run from anywhere; icot need not be installed: the repository root goes on PYTHONPATH. On a machine
# that lacks icot's requirements (deepspeed, datasets, fire, ...), put their wheels in .whl/ (see the
# device tool's README): they are installed into /tmp/site first. Each step has a time limit, so one
# that hangs still leaves the others' results. ICOT_CHECK_STEPS and ICOT_CHECK_EVAL (test examples)
# change the pipeline's size; ICOT_CHECK_PARTS (default bench,methods,repro) runs a subset, e.g. to split
# the check over two calls of a device tool that limits each call's time.
set -uo pipefail

OUT=${1:-gpu_check}
SHORT=${ICOT_CHECK_SHORT:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || PYTHON=python

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed's JIT build of FusedAdam (the GPU optimizer) reads TORCH_CUDA_ARCH_LIST and cannot parse an
# architecture suffix ("9.0a" fails with "invalid literal for int()"); the plain capability builds the same op.
if [[ ${TORCH_CUDA_ARCH_LIST:-} =~ [0-9][a-z] ]]; then
    echo "[gpu_check] TORCH_CUDA_ARCH_LIST '$TORCH_CUDA_ARCH_LIST' without its suffixes, for DeepSpeed"
    TORCH_CUDA_ARCH_LIST=$(sed -E 's/([0-9])[a-z]+/\1/g' <<<"$TORCH_CUDA_ARCH_LIST")
    export TORCH_CUDA_ARCH_LIST
fi

if [[ $SHORT == 1 ]]; then
    BENCH=(--layers 2 --hidden 32 --heads 2 --vocab 0 --examples 4 --batch_size 2 --repeats 1 --train_batch 4
           --train_steps 1 --train_warmup 1 --tiny_layers 1 --tiny_hidden 16 --threads 1 --skip_profile)
    SHAPE="layers: 2, hidden: 32, heads: 2"
    STEPS=4 TRAIN=256 EVAL=8 LIMIT=600
    # The reproduction at a tiny shape and a few steps: its stages, files and figures, not its result.
    REPRO=(--model.layers=1 --model.hidden=32 --model.heads=2 --train.precision=fp32 --train.max_steps=4
           --stepwise.steps_per_token=1 --train.eval_every=0 --train.eval_examples=4)
    REPRO_TRAIN=256 REPRO_EVAL=16
else
    BENCH=(--examples 16 --batch_size 16 --repeats 3 --train_batch 8 --train_steps 5 --train_warmup 2)
    SHAPE="layers: 12, hidden: 768, heads: 12"
    STEPS=${ICOT_CHECK_STEPS:-100} TRAIN=20000 EVAL=${ICOT_CHECK_EVAL:-100} LIMIT=240
    REPRO=()
    REPRO_TRAIN=200000 REPRO_EVAL=200
fi
PARTS=,${ICOT_CHECK_PARTS:-bench,methods,repro},
wanted() { [[ $PARTS == *,$1,* ]]; }
status=0
step() {   # step NAME LIMIT COMMAND...: run with a time limit, log to OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "[gpu_check] $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    ((rc == 0)) || { echo "[gpu_check] $name failed (exit $rc); see $OUT/$name.log"; status=1; }
    return $rc
}

# 1. The device.
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(CPU)")'
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-(unset)}"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# 2. The benchmark at GPT-2 Small shapes (tiny ones when short): eager and compiled decoding.
wanted bench && step bench "$LIMIT" "$PYTHON" -m icot bench --task 4x4 "${BENCH[@]}" --out "$OUT/bench.json" &&
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["table"])' "$OUT/bench.json" >"$OUT/bench.txt"

# 3. A GPT-2-Small-shaped pipeline of every method: bf16, ZeRO-2, activation checkpointing.
DATA=$OUT/data
cat >"$OUT/recipe.yaml" <<EOF
# tools/gpu_check.sh: GPT-2 Small's shape from scratch on 4x4 multiplication, a smoke run of every method.
methods: [icot_kd, stepwise, coconut, codi]
run_dir: $OUT/run
model: {family: gpt2, $SHAPE, max_positions: 128, tokenizer: $DATA/tokenizer, gradient_checkpointing: true}
data: {train: $DATA/train.txt, valid: $DATA/valid.txt, test: $DATA/test.txt, max_length: 128}
train: {lr: 3.0e-4, batch_size: 32, schedule: cosine, warmup_steps: 20, grad_clip: 1.0, precision: bf16,
        zero_stage: 2, max_steps: $STEPS, eval_examples: 32, log_every: 50}
icot_kd: {init_from_teacher: true, teacher_state_cache: true}
stepwise: {start: teacher, steps_per_token: $(( STEPS / 46 > 0 ? STEPS / 46 : 1 ))}
coconut: {start: teacher, steps_per_stage: $(( STEPS / 4 > 0 ? STEPS / 4 : 1 )), max_latent_stage: 3, init_token: "+"}
codi: {start: teacher}
EOF
wanted methods && step data 120 "$PYTHON" -m icot data multiply --digits 4 --train "$TRAIN" --valid 64 --test "$EVAL" --seed 0 \
    --out "$DATA" &&
    step tokenizer 120 "$PYTHON" -m icot tokenizer build "$DATA/train.txt" --kind word --out "$DATA/tokenizer" &&
    step pipeline $((LIMIT * 2)) "$PYTHON" -m icot pipeline --config "$OUT/recipe.yaml" --eval_batch_size 16

# 4. The shortened Bai et al. reproduction, on its own generated 4x4 data.
REPRO_DATA=$OUT/repro/data
wanted repro && step repro_data 180 "$PYTHON" -m icot data multiply --digits 4 --train "$REPRO_TRAIN" --valid 500 \
    --test "$REPRO_EVAL" --seed 1 --out "$REPRO_DATA" &&
    step repro_tokenizer 120 "$PYTHON" -m icot tokenizer build "$REPRO_DATA/train.txt" --kind word \
        --out "$REPRO_DATA/tokenizer" &&
    step repro $((LIMIT * 9 / 4)) "$PYTHON" -m icot pipeline --config icot/recipes/stepwise_bai_4x4_short.yaml \
        --run_dir="$OUT/repro/run" --model.tokenizer="$REPRO_DATA/tokenizer" --data.train="$REPRO_DATA/train.txt" \
        --data.valid="$REPRO_DATA/valid.txt" --data.test="$REPRO_DATA/test.txt" "${REPRO[@]}" --eval_batch_size 64

"$PYTHON" tools/gpu_check_figures.py "$OUT" >"$OUT/figures.txt" 2>&1 || status=1

{
    echo "# GPU check ($(date -u +%FT%TZ), $([[ $SHORT == 1 ]] && echo short || echo full))"
    echo
    echo '```'
    cat "$OUT/device.txt"
    echo '```'
    echo
    echo "## icot bench (GPT-2 Small shapes$([[ $SHORT == 1 ]] && echo ', shortened to tiny ones'))"
    echo '```'
    cat "$OUT/bench.txt" 2>/dev/null || echo "(no bench result: see bench.log)"
    echo '```'
    echo
    echo "## Pipeline of every method ($SHAPE; bf16, ZeRO-2, activation checkpointing, $STEPS steps a stage)"
    cat "$OUT/run/results.md" 2>/dev/null || echo "(no pipeline result: see pipeline.log)"
    echo
    echo "## Bai et al. 4x4 from scratch, shortened (icot/recipes/stepwise_bai_4x4_short.yaml)"
    cat "$OUT/repro/run/results.md" 2>/dev/null || echo "(no reproduction result: see repro.log)"
    echo
    echo "## Figures (figures.json)"
    echo '```'
    cat "$OUT/figures.txt"
    echo '```'
} >"$OUT/summary.md"
cat "$OUT/summary.md"
exit "$status"
