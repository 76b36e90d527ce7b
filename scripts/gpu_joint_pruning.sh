#!/usr/bin/env bash
# The GPU checks of issue 17 in one short device session (prepared; no device was lent when it was written):
#   1. the structured benchmark on the device machine's 16-core CPU (the benchmark is CPU-only): conv pruning 25/50/75% and the DPHuBERT-size structure,
#      time/MAC ratios against HuBERT Base's shape;
#   2. the tiny study's joint pruning against distillation alone and the combination at the same size
#      (joint_params, kd, kd_head_lr: 2.40 M parameters, 3000 training steps each), PR and SID through
#      S3PRL's runner, sharing the GPU, stopped at the deadline so that what finished is packed.
# Usage (repository root, package importable): bash scripts/gpu_joint_pruning.sh OUTDIR [DEADLINE_SECONDS]
# OUTDIR receives log lines on stdout, bench_structured.txt, results.tgz (result/tiny without weights) and
# delta_joint_params.tgz. The experiment resumes when run again (finished results are kept).
set -u
OUTDIR=${1:?give an output folder}
DEADLINE=${2:-540}
PY=${PYTHON:-python3}
CLI="$PY -m upstream_compressed.cli"
mkdir -p "$OUTDIR"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }

stamp "corpus (background) + structured benchmark"
( [ -f data/embedded_corpus/corpus.json ] || $CLI make-corpus data/embedded_corpus --quiet ) > /tmp/corpus.txt 2>&1 &
corpus=$!
timeout 200 $PY benchmarks/structured.py > "$OUTDIR/bench_structured.txt" 2>&1
tail -1 "$OUTDIR/bench_structured.txt"
wait $corpus || { stamp "corpus failed"; cat /tmp/corpus.txt; exit 1; }

stamp "experiment ($(left) s left)"
timeout "$(left)" $CLI experiment tiny --corpus data/embedded_corpus --expdir result/tiny --device cuda \
    --models joint_params,kd,kd_head_lr,conv50 --jobs 8 2>&1 | tr '\r' '\n' | grep -E "^(done|FAILED)|rror"
timeout 60 $CLI report result/tiny 2>&1 | tail -3

stamp "pack"
tar czf "$OUTDIR/results.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='work' \
    --exclude='voxceleb1_cache' result/tiny
delta=result/tiny/models/joint_params/delta.safetensors
[ -f $delta ] && tar czf "$OUTDIR/delta_joint_params.tgz" $delta
stamp "end"
