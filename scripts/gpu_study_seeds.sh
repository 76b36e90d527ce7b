#!/usr/bin/env bash
# Issue 19 item 6: the tiny study's claims re-scored with three downstream seeds each, on one GPU
# (prepared on a CPU machine; no GPU was lent when it was written). Each claim's models run with
# `--seeds 0,1,2`, so the report gives every PR/SID entry test_runs, test_mean, test_ci95 and vs_base
# (paired bootstrap over seeds and utterances), from which each verdict is read as held, not held or
# not resolved at this noise:
#   A. head criteria against random at 50% and 75% (no recovery): l1, data_driven, random;
#   B. diagonal heads (most / least diagonal first) and FFN rows against heads for SID;
#   C. weight pruning at 50/70/90%, and KD -> heads -> low-rank against KD alone at equal size.
# 16 processes share the GPU (base only in A: two processes must never run the same folder); finished runs are kept, so running it again (or another device session)
# continues where the deadline stopped it. Usage (repository root, package importable):
#   bash scripts/gpu_study_seeds.sh OUTDIR [DEADLINE_SECONDS]
# OUTDIR receives log.txt, report/ (report.md, report.json, plots) and results.tgz (result/tiny without weights).
set -u
OUTDIR=${1:?give an output folder}
DEADLINE=${2:-540}
PY=${PYTHON:-python3}
CLI="$PY -m upstream_compressed.cli"
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/log.txt") 2>&1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - start) - 40 )); }  # 40 s kept for the report and packing

[ -f data/embedded_corpus/corpus.json ] || $CLI make-corpus data/embedded_corpus --quiet
run() { timeout "$(left)" $CLI experiment recipes/tiny/plan.yaml --corpus data/embedded_corpus --expdir result/tiny \
          --device cuda --seeds 0,1,2 "$@" 2>&1 | tr '\r' '\n' | grep -E "^(done|FAILED)|rror"; }
stamp "A, B, C in parallel ($(left) s)"
run --jobs 7 --models base,heads50_l1_norecovery,heads50_data_driven_norecovery,heads50_random_norecovery,heads75_l1_norecovery,heads75_data_driven_norecovery,heads75_random_norecovery &
run --jobs 5 --tasks sid --models heads50_diagonal_first,heads50_diagonal_last,rows25_l1_norecovery,rows25_data_driven_norecovery &
run --jobs 4 --models wp50,wp70,wp90,kd,kd_head_lr &
wait
stamp "report"
$CLI report result/tiny -o "$OUTDIR/report" 2>&1 | tail -3
tar czf "$OUTDIR/results.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='work' \
    --exclude='voxceleb1_cache' result/tiny
stamp "end"
