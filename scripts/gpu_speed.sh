#!/usr/bin/env bash
# Issue 20's GPU timings in one short device session (prepared on a CPU machine; no GPU was lent when
# it was written, so its figures are still to be measured):
#   1. our HuBERT against S3PRL's hubert_local on the same HuBERT Base-shaped checkpoint, on CUDA:
#      10 s and a batch of 8 x 10 s, fp32, and our upstream with `precision: bf16` (-g) against our fp32
#      (goals: ours <= 0.8x S3PRL's in fp32; bf16 >= 2x faster than fp32);
#   2. `compile: true` against eager on CUDA (benchmarks/compile.py);
#   3. a SUPERB PR training step through S3PRL's runner, our upstream against hubert_local, fp32 and bf16.
# Usage (repository root, package importable): bash scripts/gpu_speed.sh OUTDIR [DEADLINE_SECONDS]
# OUTDIR receives log.txt and one .txt per benchmark; each benchmark's last line is its JSON.
set -u
OUTDIR=${1:?give an output folder}
DEADLINE=${2:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/log.txt") 2>&1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
bench() {  # name, seconds allowed, command...
  local name=$1 limit=$2; shift 2
  [ "$(left)" -gt 20 ] || { stamp "skipped $name: deadline"; return; }
  [ "$limit" -lt "$(left)" ] || limit=$(left)
  stamp "$name"
  timeout "$limit" "$@" > "$OUTDIR/$name.txt" 2>&1 || echo "($name ended with $?)"
  tail -1 "$OUTDIR/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
( [ -f data/embedded_corpus/corpus.json ] || $PY -m upstream_compressed.cli make-corpus data/embedded_corpus --quiet ) \
  > "$OUTDIR/corpus.txt" 2>&1 &
corpus=$!

bench vs_s3prl_fp32_1x10s 60 $PY benchmarks/vs_s3prl.py --device cuda --seconds 10 --batch 1 --rounds 20
bench vs_s3prl_fp32_8x10s 60 $PY benchmarks/vs_s3prl.py --device cuda --seconds 10 --batch 8 --rounds 20
bench vs_s3prl_bf16_1x10s 60 $PY benchmarks/vs_s3prl.py --device cuda --seconds 10 --batch 1 --rounds 20 --dtype bf16
bench vs_s3prl_bf16_8x10s 60 $PY benchmarks/vs_s3prl.py --device cuda --seconds 10 --batch 8 --rounds 20 --dtype bf16
bench compile 120 $PY benchmarks/compile.py --device cuda
wait $corpus || { stamp "corpus failed"; cat "$OUTDIR/corpus.txt"; }
bench superb_step_fp32 120 $PY benchmarks/superb_step.py --corpus data/embedded_corpus --device cuda --steps 10,60
bench superb_step_bf16 120 $PY benchmarks/superb_step.py --corpus data/embedded_corpus --device cuda --steps 10,60 \
  --precision bf16
stamp "end"
