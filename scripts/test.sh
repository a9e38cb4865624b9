#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, offline:
#   1. TransformerLens 3.9: every test (HookedTransformer and TransformerBridge, real offline models).
#   2. TransformerLens 4.x: the backend-independent `core` tests on TransformerBridge.
# Extra arguments go to the first pytest run (e.g. `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tl4
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
echo "== TransformerLens $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("transformer-lens"))'): full suite"
.venv/bin/python -m pytest -q "$@"
echo "== TransformerLens $(PYTHONPATH=.tl4-site .venv/bin/python -c 'import importlib.metadata as m; print(m.version("transformer-lens"))'): core tests on TransformerBridge"
PYTHONPATH=.tl4-site .venv/bin/python -m pytest -q -m core -p no:cacheprovider
echo "== tests took $(( $(date +%s) - start )) s"
