#!/usr/bin/env bash
# The embedded default on one GPU machine, as run for the README's numbers:
#   1. make the corpus, 2. pretrain the bundled tiny HuBERT on the GPU, 3. run recipes/tiny/plan.yaml
#   (compress every model, SUPERB PR and SID on each) with 16 processes sharing the GPU.
# Usage (repository root, package importable, e.g. `pip install -e .`):
#   bash scripts/gpu_embedded_default.sh OUTDIR [PRETRAIN_STEPS] [EXPERIMENT_SECONDS]
# The experiment stage resumes where it stopped when run again (finished results are kept).
set -u
OUTDIR=${1:?give an output folder}
STEPS=${2:-4000}
LIMIT=${3:-3600}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

stamp "corpus"
[ -f data/embedded_corpus/corpus.json ] || $PY -m upstream_compressed.cli make-corpus data/embedded_corpus --quiet || exit 1

CKPT=upstream_compressed/embedded/checkpoints/tiny_hubert.pt
mkdir -p result/tiny
if [ ! -f result/tiny/.pretrained ]; then
  stamp "pretrain ($STEPS steps)"
  $PY -m upstream_compressed.cli pretrain data/embedded_corpus -o $CKPT --device cuda --steps "$STEPS" \
      --eval-every 500 --threads 8 --feature-grad-mult 1.0 --nomask-weight 1.0 \
      --conv-layers "[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2" --quiet || exit 1
  touch result/tiny/.pretrained
fi
cp $CKPT ${CKPT%.pt}.json "$OUTDIR/"

stamp "experiment"
timeout "$LIMIT" $PY -m upstream_compressed.cli experiment recipes/tiny/plan.yaml --corpus data/embedded_corpus --expdir result/tiny \
    --jobs 16 --device cuda 2>&1 | tr '\r' '\n' | grep -E "^(done|FAILED)|rror" | tee "$OUTDIR/experiment.log"
stamp "pack"
tar czf "$OUTDIR/results.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='work' --exclude='voxceleb1_cache' result/tiny
tar czf "$OUTDIR/deltas.tgz" result/tiny/models/*/delta.safetensors 2>/dev/null
stamp "end"
