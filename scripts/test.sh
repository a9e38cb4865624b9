#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, offline:
#   1. TransformerLens 3.9: every test (HookedTransformer and TransformerBridge, real offline models).
#   2. TransformerLens 4.x: every test not marked `tl3_only`, on TransformerBridge, except the `slow`
#      ones (real offline models, minutes each) and the `no_model` ones (no model, no TransformerLens
#      code: the same test twice).
# The two runs go at the same time, so that both cores work: run 1 on pytest-xdist workers (`-n`,
# ICL_KERNELS_TEST_WORKERS, default 2; whole files per worker, `--dist loadfile`), its output live; run 2
# in one process, its output printed when run 1 ends (ICL_KERNELS_TEST_SERIAL=1: one after the other, no
# xdist). Every process runs torch on one thread (OMP_NUM_THREADS=1 unless set): more threads than
# free cores are many times slower on a shared CPU.
# As root (CI runs as root), first a one-node SLURM cluster on localhost (scripts/slurm_cluster.sh: Debian
# packages installed if missing, seconds when installed) for the `slurm` test of run 1, which
# otherwise skips and says why; ICL_KERNELS_SLURM=0 leaves SLURM alone. A cluster that does not
# start never fails this script.
# Extra arguments go to the first pytest run (e.g. `-m "not slow"`, `-n 0`). Both runs always run; each
# prints its 15 slowest tests. The script fails if either run fails, including pytest's exit code 5 (no
# test collected, e.g. a marker expression that selects nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tl4
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $(id -u) == 0 && "${ICL_KERNELS_SLURM:-1}" != 0 ]]; then
    timeout 900 bash scripts/slurm_cluster.sh start || echo "== SLURM cluster not started; the slurm test skips"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
failed=()

run_pytest() {  # run_pytest NAME COMMAND...: run one pytest command; prints its time, returns its exit code
    local name=$1 code=0 began
    shift
    began=$(date +%s)
    "$@" || code=$?
    echo "== $name took $(( $(date +%s) - began )) s"
    if (( code == 5 )); then
        echo "== $name: no test was collected (pytest exit code 5)"
    fi
    return $code
}

tl_version() { "$@" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))'; }
tl3="TransformerLens $(tl_version .venv/bin/python)"
tl4="TransformerLens $(PYTHONPATH=.tl4-site tl_version .venv/bin/python)"
tl3_run=(.venv/bin/python -m pytest -q --durations=15)
tl4_run=(env PYTHONPATH=.tl4-site .venv/bin/python -m pytest -q --durations=15 -m "not slow and not tl3_only and not no_model" -p no:cacheprovider)

if [[ "${ICL_KERNELS_TEST_SERIAL:-0}" == 1 ]]; then
    echo "== $tl3: full suite"
    run_pytest "$tl3" "${tl3_run[@]}" "$@" || failed+=("$tl3 (exit $?)")
    echo "== $tl4: every test not marked tl3_only, slow or no_model, on TransformerBridge"
    run_pytest "$tl4" "${tl4_run[@]}" || failed+=("$tl4 (exit $?)")
else
    tl4_log=$(mktemp "${TMPDIR:-/tmp}/icl-kernels-tl4.XXXXXX")
    trap 'rm -f "$tl4_log"' EXIT
    echo "== $tl4 (every test not marked tl3_only, slow or no_model, on TransformerBridge) runs alongside; its output follows run 1's"
    run_pytest "$tl4" "${tl4_run[@]}" >"$tl4_log" 2>&1 &
    tl4_pid=$!
    echo "== $tl3: full suite, on ${ICL_KERNELS_TEST_WORKERS:-2} pytest-xdist workers"
    run_pytest "$tl3" "${tl3_run[@]}" -n "${ICL_KERNELS_TEST_WORKERS:-2}" --dist loadfile "$@" || failed+=("$tl3 (exit $?)")
    tl4_code=0
    wait "$tl4_pid" || tl4_code=$?
    echo "== $tl4: every test not marked tl3_only, slow or no_model, on TransformerBridge"
    cat "$tl4_log"
    (( tl4_code == 0 )) || failed+=("$tl4 (exit $tl4_code)")
fi
echo "== tests took $(( $(date +%s) - start )) s"
if (( ${#failed[@]} )); then
    printf '== FAILED: %s\n' "${failed[@]}"
    exit 1
fi
