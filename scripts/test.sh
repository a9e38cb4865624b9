#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, offline:
#   1. TransformerLens 3.9: every test (HookedTransformer and TransformerBridge, real offline models).
#   2. TransformerLens 4.x: every test not marked `tl3_only`, on TransformerBridge, except the `slow`
#      ones (real offline models, minutes each): 4.5 to 7 min on the shared, loaded 2-core CPU.
# As root (CI runs as root), first a one-node SLURM cluster on localhost (scripts/slurm_cluster.sh: Debian
# packages installed if missing, seconds when installed) for the `slurm` test of run 1, which
# otherwise skips and says why; ICL_KERNELS_SLURM=0 leaves SLURM alone. A cluster that does not
# start never fails this script.
# Extra arguments go to the first pytest run (e.g. `-m "not slow"`). Both runs always run; each prints
# its 25 slowest tests. The script fails if either run fails, including pytest's exit code 5 (no test
# collected, e.g. a marker expression that selects nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tl4
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $(id -u) == 0 && "${ICL_KERNELS_SLURM:-1}" != 0 ]]; then
    timeout 900 bash scripts/slurm_cluster.sh start || echo "== SLURM cluster not started; the slurm test skips"
fi
start=$(date +%s)
failed=()

run_pytest() {  # run_pytest NAME COMMAND...: run one pytest command, record a failure under NAME
    local name=$1 code=0 began
    shift
    began=$(date +%s)
    "$@" || code=$?
    echo "== $name took $(( $(date +%s) - began )) s"
    if (( code == 5 )); then
        echo "== $name: no test was collected (pytest exit code 5)"
    fi
    if (( code != 0 )); then
        failed+=("$name (exit $code)")
    fi
}

tl_version() { "$@" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))'; }
tl3="TransformerLens $(tl_version .venv/bin/python)"
tl4="TransformerLens $(PYTHONPATH=.tl4-site tl_version .venv/bin/python)"

echo "== $tl3: full suite"
run_pytest "$tl3" .venv/bin/python -m pytest -q --durations=25 "$@"
echo "== $tl4: every test not marked tl3_only or slow, on TransformerBridge"
run_pytest "$tl4" env PYTHONPATH=.tl4-site .venv/bin/python -m pytest -q --durations=25 \
    -m "not slow and not tl3_only" -p no:cacheprovider
echo "== tests took $(( $(date +%s) - start )) s"
if (( ${#failed[@]} )); then
    printf '== FAILED: %s\n' "${failed[@]}"
    exit 1
fi
