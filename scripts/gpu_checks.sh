#!/usr/bin/env bash
# The GPU checks of one short device session, as run for the README's GPU numbers:
#   1. the weight-pruning benchmark on the GPU (fp32: cuSPARSE CSR vs dense; fp16: CSR and 2:4 vs
#      dense), while the corpus is made on the CPU;
#   2. the CUDA-only test and `profile --device cuda`;
#   3. the tiny-study runs still missing (KD vs KD → heads → low-rank, weight pruning 50/90%, the
#      head criteria with recovery and the diagonal orders for PR, heads at 75% for SID), 16 processes
#      sharing the GPU, stopped at the deadline so that what finished is packed.
# Usage (repository root, package importable): bash scripts/gpu_checks.sh OUTDIR [DEADLINE_SECONDS]
# OUTDIR receives log.txt, bench_fp32.txt, bench_fp16.txt, results.tgz (result/tiny without weights)
# and delta_<model>.tgz for kd, kd_head_lr, wp50, wp90 (one per model: a device returns files of at most 16 MB). The experiment resumes when run again (finished results are kept).
set -u
OUTDIR=${1:?give an output folder}
DEADLINE=${2:-540}
PY=${PYTHON:-python3}
CLI="$PY -m upstream_compressed.cli"
mkdir -p "$OUTDIR"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }

stamp "corpus (background) + weight-pruning benchmark on the GPU"
( [ -f data/embedded_corpus/corpus.json ] || $CLI make-corpus data/embedded_corpus --quiet ) > /tmp/corpus.txt 2>&1 &
corpus=$!
timeout 100 $PY benchmarks/weight_pruning.py --device cuda --rounds 20 > "$OUTDIR/bench_fp32.txt" 2>&1
tail -1 "$OUTDIR/bench_fp32.txt"
timeout 100 $PY benchmarks/weight_pruning.py --device cuda --dtype float16 --two-four --rounds 20 \
    > "$OUTDIR/bench_fp16.txt" 2>&1
tail -1 "$OUTDIR/bench_fp16.txt"
wait $corpus || { stamp "corpus failed"; cat /tmp/corpus.txt; exit 1; }
cat /tmp/corpus.txt
sha256sum data/embedded_corpus/corpus.json

stamp "CUDA test + profile --device cuda"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_weight_pruning.py -k cuda 2>&1 | tail -3
timeout 60 $CLI profile -u hubert_local -k upstream_compressed/embedded/checkpoints/tiny_hubert.pt \
    --device cuda --seconds 10 --json 2>&1 | tail -1

stamp "experiment ($(left) s left)"
PLAN=recipes/tiny/plan.yaml
run() { timeout "$(left)" $CLI experiment $PLAN --corpus data/embedded_corpus --expdir result/tiny --device cuda "$@" 2>&1 \
        | tr '\r' '\n' | grep -E "^(done|FAILED)|rror"; }
run --models kd,kd_head_lr,wp50,wp90 --jobs 8 &
run --models heads50_diagonal_first,heads50_diagonal_last,heads50_l1,heads50_data_driven,heads50_random \
    --tasks pr --jobs 5 &
run --models heads75_l1_norecovery,heads75_data_driven_norecovery,heads75_random_norecovery,heads50_random_seed2_norecovery \
    --tasks sid --jobs 3 &
wait
stamp "profile of wp90 on cuda"
[ -f result/tiny/models/wp90/delta.safetensors ] && timeout 40 $CLI profile -u compressed_local \
    -k result/tiny/models/wp90/delta.safetensors --device cuda --seconds 10 --json 2>&1 | tail -1

stamp "pack"
tar czf "$OUTDIR/results.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='work' \
    --exclude='voxceleb1_cache' result/tiny
for model in kd kd_head_lr wp50 wp90; do
  delta=result/tiny/models/$model/delta.safetensors
  [ -f $delta ] && tar czf "$OUTDIR/delta_$model.tgz" $delta
done
stamp "end"
