#!/usr/bin/env bash
# The full-scale GPU checks (issue: LibriSpeech 960 h and HuBERT Base on GPUs), for one short device
# session; written for a session without a GPU, so not yet run:
#   1. every full recipe at HuBERT Base shape, 1 step per loop, default AMP (bf16 where supported);
#   2. kd (DistilHuBERT's schedule) for 20 steps in fp32 and in bf16: seconds per step;
#   3. the same bf16 run with num_workers=0 against the default workers: does the loader keep the GPU busy?
# Seconds per step x the recipe's steps / GPUs gives the projected GPU-hours for the docs.
# Usage (repository root, package importable): bash scripts/gpu_full_scale.sh OUTDIR
set -u
OUTDIR=${1:?give an output folder}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
bench() { local name=$1; shift; timeout 240 $PY benchmarks/full_recipes.py --workdir /tmp/full_recipes "$@" \
          > "$OUTDIR/$name.txt" 2>&1; tail -1 "$OUTDIR/$name.txt"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
stamp "every full recipe, 1 step per loop (AMP default)"
bench all_1step
stamp "kd, 20 steps: fp32, bf16, bf16 without workers"
bench kd_fp32 --recipes kd --limit-steps 20 --train-option amp=false
bench kd_bf16 --recipes kd --limit-steps 20
bench kd_bf16_noworkers --recipes kd --limit-steps 20 --train-option num_workers=0
stamp "end"
