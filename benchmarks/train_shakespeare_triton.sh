#!/usr/bin/env bash
# TinyShakespeare quality run of stage 5 on one GPU: the `base` spiking model trained for a
# wall-clock budget (default 10 minutes), then its ANN twin for the same number of steps (the
# same tokens; one timestep, so it needs less time).
#   [VOCAB=264] bash benchmarks/train_shakespeare_triton.sh path/to/tinyshakespeare.txt [minutes] [steps] [extra options]
# VOCAB is the tokenizer's vocabulary size (default 2000 syllables; 264 = characters only).
# steps sizes the cosine schedule to end near the budget (measure ms/step first:
# python benchmarks/bench_triton.py --only step). Stage 1 splits off the last 10% as validation.
# The README's figures: ... 5.5 1300 --kernels triton --compile 1 --lr 3e-4 --min_lr 3e-5 --dropout 0.2
# (1,300 steps: a schedule that ends before the model memorises the corpus; about 4 minutes on an H100).
# Each run prints "val @ context 512: ... bits/char" on the whole validation split at every
# evaluation (and at 4x the context); the last lines give the best and the final value of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=${1:?usage: train_shakespeare_triton.sh PATH/TO/tinyshakespeare.txt [minutes] [steps] [options]}
MINUTES=${2:-10}
STEPS=${3:-3000}
PY=${PYTHON:-python}
VOCAB=${VOCAB:-2000}
mkdir -p out
$PY 2_tokenizer.py --source "files:$TEXT" --vocab-size "$VOCAB"
COMMON=(--preset base --source "files:$TEXT" --vocab_size "$VOCAB" --max_steps "$STEPS" --warmup 200 --eval_interval 100
        --max_new_tokens 200 --overwrite 1 "${@:4}")
$PY 5_spike_llm_triton.py "${COMMON[@]}" --max_minutes "$MINUTES" --out_dir out/shakespeare_base_snn \
    | tee out/shakespeare_base_snn.log
$PY 5_spike_llm_triton.py "${COMMON[@]}" --spiking 0 --out_dir out/shakespeare_base_ann \
    | tee out/shakespeare_base_ann.log
for run in snn ann; do             # best and last validation figure at the training context
    grep -o "step [0-9]*: val @ context 512: .* bits/char" "out/shakespeare_base_$run.log" \
        | awk -v run="$run" '{bpc = $(NF-1); if (best == "" || bpc < best) {best = bpc; at = $2; sub(":", "", at)}; last = bpc}
              END {print run ": best " best " bits/char at step " at " last " last}'
done
