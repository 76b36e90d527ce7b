#!/usr/bin/env bash
# The main job: compress -> SUPERB PR and SID -> profile -> report, every stage resumable.
#
#   ./run_downstream.sh                      # embedded default: bundled tiny HuBERT + synthesised corpus,
#                                            # recipes/quick/plan.yaml, 19 minutes on a quiet 2-core CPU
#   ./run_downstream.sh --plan recipes/tiny/plan.yaml --device cuda --jobs 16      # the full tiny study
#   ./run_downstream.sh --librispeech /data/LibriSpeech --lexicon /data/librispeech-lexicon.txt \
#       --voxceleb1 /data/VoxCeleb1 --base hubert_base --recipes "recipes/full/heads50.yaml recipes/full/kd.yaml" \
#       --device cuda --expdir result/full   # real data, official SUPERB configs (a GPU job)
#   ./run_downstream.sh ... --seeds 0,1,2    # every downstream run once per seed (the report's intervals use them)
#
# Real data follows SUPERB's protocol: PR and SID each search the learning rates 1e-1, 1e-2, 1e-3, 1e-4
# with the first seed, test the rate with the best dev score and run the other seeds at it only
# (n_rates + n_seeds - 1 runs per model and task; --no-lr-search turns it off). The default (no
# arguments) runs once per model and task, at the configs' rates, S3PRL's seed.
#
# Stages (--stages, comma-separated; default all): corpus, experiment (compress, train, test), profile,
# report, submission (SUPERB leaderboard: MAC protocol + predict.zip for one model, --submit). Work already done is kept (deltas, result.json, profile.json): a killed job resumes where
# it stopped; --force starts EXPDIR again.
set -euo pipefail
cd "$(dirname "$0")"

usage() { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" | sed 's/^# \{0,1\}//'; cat <<'EOF'

Options:
  --plan FILE          experiment plan (default recipes/quick/plan.yaml; see upstream_compressed/experiments.py)
  --expdir DIR         output folder (default result/<plan name>, e.g. result/quick)
  --corpus DIR         make-corpus folder (default data/embedded_corpus; made when missing)
  --librispeech DIR    real LibriSpeech root (train-clean-100, dev-clean, test-clean): PR on real data
  --lexicon FILE       LibriSpeech lexicon for PR (S3PRL's librispeech-lexicon-200k-g2p.txt)
  --voxceleb1 DIR      real VoxCeleb1 root (with iden_split.txt inside, or give --voxceleb1-split)
  --voxceleb1-split F  VoxCeleb1 identification split file
  --base CKPT          base checkpoint (path or known name: hubert_base, distilhubert_base, tiny_hubert)
  --recipes "A B ..."  recipes to compress (real-data mode; each becomes a model named after its file)
  --models LIST        only these plan models (comma-separated; default all)
  --jobs N             processes at a time (default 2)
  --device cpu|cuda    device for training (default cpu)
  --stages LIST        corpus,experiment,profile,report,submission (default all)
  --submit MODEL       the model the submission stage packages (default base)
  --profile-seconds S  audio length for the profile (default 10)
  --seeds LIST         downstream seeds, comma-separated (e.g. 0,1,2): each run repeated per seed
                       (default: one run, S3PRL's seed)
  --sid-lr-search LIST SID learning rates to search, comma-separated (real data default 0.1,0.01,0.001,0.0001;
                       elsewhere none); the best dev accuracy is chosen (a tie: the first listed)
  --pr-lr-search LIST  the same for PR, the lowest dev PER chosen
  --no-lr-search       real data without the search: the official configs' learning rates
  --launcher KIND      local (default): --jobs processes here; slurm: every compression and downstream
                       run is its own Slurm job (submitit); submitit-local: the same jobs on this machine
  --slurm-partition P  --slurm-gpus N  --slurm-time MIN  --slurm-mem GB  --slurm-cpus N
                       per-job resources with --launcher slurm (defaults: 1 GPU, 240 min, 32 GB, 8 CPUs)
  --force              delete EXPDIR first
EOF
}

PLAN="" EXPDIR="" CORPUS=data/embedded_corpus LIBRISPEECH="" LEXICON="" VOXCELEB1="" VOX_SPLIT=""
LAUNCH_ARGS=() EXPERIMENT_ARGS=() LR_SEARCH=1
BASE="" RECIPES="" MODELS="" JOBS=2 DEVICE=cpu STAGES=corpus,experiment,profile,report,submission SECONDS_AUDIO=10 FORCE=0 SUBMIT=base
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) PLAN=$2; shift 2 ;;
    --expdir) EXPDIR=$2; shift 2 ;;
    --corpus) CORPUS=$2; shift 2 ;;
    --librispeech) LIBRISPEECH=$2; shift 2 ;;
    --lexicon) LEXICON=$2; shift 2 ;;
    --voxceleb1) VOXCELEB1=$2; shift 2 ;;
    --voxceleb1-split) VOX_SPLIT=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --recipes) RECIPES=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --stages) STAGES=$2; shift 2 ;;
    --submit) SUBMIT=$2; shift 2 ;;
    --profile-seconds) SECONDS_AUDIO=$2; shift 2 ;;
    --launcher) LAUNCH_ARGS+=(--launcher "$2"); shift 2 ;;
    --slurm-partition|--slurm-gpus|--slurm-time|--slurm-mem|--slurm-cpus) LAUNCH_ARGS+=("$1" "$2"); shift 2 ;;
    --seeds|--sid-lr-search|--pr-lr-search) EXPERIMENT_ARGS+=("$1" "$2"); shift 2 ;;
    --no-lr-search) LR_SEARCH=0; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_downstream.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

CLI=(python -m upstream_compressed.cli)
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
fail() { echo "run_downstream.sh: error: $*" >&2; exit 2; }
stamp() { echo "== [$(date +%H:%M:%S)] $*"; }
START=$(date +%s)

python -c "import torch, s3prl, upstream_compressed" 2>/dev/null || fail "upstream_compressed (with torch and s3prl) is not importable by \`python\`: activate its environment or run \`pip install -e .\` first"

REAL=0
if [ -n "$LIBRISPEECH$VOXCELEB1$RECIPES" ]; then REAL=1; fi
if [ $REAL = 1 ]; then
  # Real data: write a plan for the given recipes and data, with the official SUPERB configs.
  [ -n "$RECIPES" ] || fail "--recipes is required with real data"
  [ -n "$LIBRISPEECH$VOXCELEB1" ] || fail "give --librispeech (PR) and/or --voxceleb1 (SID)"
  [ -z "$LIBRISPEECH" ] || [ -d "$LIBRISPEECH" ] || fail "--librispeech $LIBRISPEECH is not a folder"
  [ -z "$LIBRISPEECH" ] || [ -n "$LEXICON" ] || fail "--lexicon is required with --librispeech (S3PRL's librispeech-lexicon-200k-g2p.txt)"
  [ -z "$VOXCELEB1" ] || [ -d "$VOXCELEB1" ] || fail "--voxceleb1 $VOXCELEB1 is not a folder"
  EXPDIR=${EXPDIR:-result/real}
  [ $FORCE = 0 ] || rm -rf "$EXPDIR"
  mkdir -p "$EXPDIR"
  PLAN=$EXPDIR/plan.yaml
  TASKS=""
  [ -z "$LIBRISPEECH" ] || TASKS=pr
  [ -z "$VOXCELEB1" ] || TASKS=${TASKS:+$TASKS,}sid
  export LIBRISPEECH VOXCELEB1  # recipes/full/*.yaml read their audio as ${LIBRISPEECH}/...
  python - "$PLAN" "$BASE" "$LIBRISPEECH" "$LEXICON" "$VOXCELEB1" "${VOX_SPLIT:-${VOXCELEB1:+$VOXCELEB1/iden_split.txt}}" \
      "$LR_SEARCH" $RECIPES <<'EOF'
import sys, yaml
from pathlib import Path
plan, base, libri, lexicon, vox, split, lr_search, *recipes = sys.argv[1:]
from upstream_compressed.recipe import load_recipe, technique_name
# The plan lives in EXPDIR and its relative paths would be read from there: write them absolute.
absolute = lambda value: str(Path(value).resolve()) if value else "/nonexistent"
models = [{"name": "base", "method": "base"}]
for r in recipes:  # a path or a bundled name (full/kd)
    recipe = load_recipe(r, base=base) if base else load_recipe(r)
    models.append({"name": Path(r).stem, "method": technique_name(recipe.steps), "recipe": str(recipe.source.resolve())})
vocab = str(Path("upstream_compressed/corpus/phoneme.txt").resolve())
data = {"librispeech": absolute(libri), "lexicon": absolute(lexicon), "vocab": vocab,
        "voxceleb1": absolute(vox), "voxceleb1_split": absolute(split)}
base = absolute(base) if base and Path(base).is_file() else base
# SUPERB's protocol: each task's learning rate searched (the first seed), the best dev score's tested.
search = {"sid_lr_search": [0.1, 0.01, 0.001, 0.0001], "pr_lr_search": [0.1, 0.01, 0.001, 0.0001]}
Path(plan).write_text(yaml.safe_dump({"base": base or "hubert_base", "override_base": bool(base), "data": data,
    "pr_config": "ctc_libriphone", "sid_config": "voxceleb1",
    **(search if lr_search == "1" else {}), "models": models}, sort_keys=False))
EOF
  PLAN_ARGS=()
else
  PLAN=${PLAN:-recipes/quick/plan.yaml}
  [ -f "$PLAN" ] || fail "--plan $PLAN does not exist"
  NAME=$(basename "$(dirname "$PLAN")")
  EXPDIR=${EXPDIR:-result/$NAME}
  [ $FORCE = 0 ] || rm -rf "$EXPDIR"
  TASKS=pr,sid
  PLAN_ARGS=(--corpus "$CORPUS")
  if has_stage corpus; then
    if [ -f "$CORPUS/corpus.json" ]; then
      stamp "corpus: $CORPUS (exists)"
    else
      stamp "corpus: making $CORPUS"
      "${CLI[@]}" make-corpus "$CORPUS"
    fi
  fi
  # --corpus reaches everything through `experiment --corpus`: downstreams read it, and recipes read
  # their audio as ${CORPUS}/..., which experiment sets from it. No link is made or replaced, so
  # data/embedded_corpus stays as it is, whatever it is (a real folder, a link, or nothing).
fi

[ -z "$MODELS" ] || PLAN_ARGS+=(--models "$MODELS")
if has_stage experiment; then
  stamp "experiment: $PLAN -> $EXPDIR (compress, then PR/SID train and test; $JOBS at a time on $DEVICE)"
  "${CLI[@]}" experiment "$PLAN" --expdir "$EXPDIR" --tasks "$TASKS" --jobs "$JOBS" --device "$DEVICE" "${PLAN_ARGS[@]}" \
      ${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"} ${EXPERIMENT_ARGS[@]+"${EXPERIMENT_ARGS[@]}"}
fi
if has_stage profile; then
  stamp "profile: every model on $SECONDS_AUDIO s of audio, CPU, one at a time"
  "${CLI[@]}" experiment "$PLAN" --expdir "$EXPDIR" --no-downstream --profile-seconds "$SECONDS_AUDIO" \
      "${PLAN_ARGS[@]}" --quiet
fi
if has_stage report; then
  stamp "report"
  "${CLI[@]}" report "$EXPDIR"
fi
if has_stage submission; then
  MODEL_JSON=$EXPDIR/models/$SUBMIT/model.json
  [ -f "$MODEL_JSON" ] || fail "submission: $MODEL_JSON not found (run the experiment stage; --submit names a plan model)"
  stamp "submission: $SUBMIT (SUPERB MAC protocol, then predict.zip from its tested PR/SID expdirs)"
  read -r UPSTREAM CKPT < <(python -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['upstream'], m.get('ckpt') or '')" "$MODEL_JSON")
  "${CLI[@]}" profile -u "$UPSTREAM" ${CKPT:+-k "$CKPT"} --protocol superb --json | tee "$EXPDIR/superb_form_$SUBMIT.json"
  # S3PRL's expdir of a task: the folder itself, or with seeds its first seed's run (at the chosen rate)
  run_of() { python -c "import json, pathlib, sys; f = pathlib.Path(sys.argv[1]); r = f / 'result.json'
runs = json.loads(r.read_text()).get('runs') if r.is_file() else None; print(f / runs[0] if runs else f)" "$1"; }
  SUBMISSION=()
  [ ! -d "$EXPDIR/downstream/pr_$SUBMIT" ] || SUBMISSION+=(--pr "$(run_of "$EXPDIR/downstream/pr_$SUBMIT")")
  [ ! -d "$EXPDIR/downstream/sid_$SUBMIT" ] || SUBMISSION+=(--sid "$(run_of "$EXPDIR/downstream/sid_$SUBMIT")")
  "${CLI[@]}" submission "${SUBMISSION[@]}" -o "$EXPDIR/predict_$SUBMIT.zip"
fi
stamp "done in $(( $(date +%s) - START )) s: $EXPDIR"
