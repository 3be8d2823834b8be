#!/usr/bin/env bash
# TinyShakespeare quality run of stage 3: the `small` spiking model and its ANN twin, each
# given the same wall-clock budget (default 30 minutes) on this machine's CPU.
#   bash benchmarks/train_shakespeare_numpy.sh path/to/tinyshakespeare.txt [minutes]
# Stage 1 splits off the last 10% as validation (as nanoGPT does). Each run prints
# "val @ context 64: ... bits/char" at every evaluation (and at 4x the context) and
# finishes with its spike statistics and a sample; checkpoints go to out/shakespeare_{snn,ann}.
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=${1:?usage: train_shakespeare_numpy.sh PATH/TO/tinyshakespeare.txt [minutes]}
MINUTES=${2:-30}
PY=${PYTHON:-python}
mkdir -p out
COMMON=(--preset small --source "files:$TEXT" --max_minutes "$MINUTES" --eval_interval 250
        --eval_tokens 0 --max_new_tokens 200)
# steps sized so the cosine schedule ends near the budget (the twin runs one timestep, ~4x faster)
$PY 3_spike_llm_numpy.py "${COMMON[@]}" --max_steps 3000 --out_dir out/shakespeare_snn | tee out/shakespeare_snn.log
$PY 3_spike_llm_numpy.py "${COMMON[@]}" --max_steps 10000 --spiking 0 --out_dir out/shakespeare_ann | tee out/shakespeare_ann.log
