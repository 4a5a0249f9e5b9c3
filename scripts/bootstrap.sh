#!/usr/bin/env bash
# Sets up ./.venv with the pinned dependencies and builds the extension into
# the source tree, saying what it does. A second run with nothing changed
# installs and builds nothing; a changed C++ file recompiles that file only.
#
#   bash scripts/bootstrap.sh          # PYTHON=python3.11 to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { echo "== bootstrap: $*"; }
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

# Dependencies: installed again only when requirements.txt changed.
stamp=.venv/.surgellm-requirements
if [ ! -f "$stamp" ] || ! cmp -s requirements.txt "$stamp"; then
  step "installing requirements.txt (the first time: several minutes, torch is large)"
  .venv/bin/python -m pip install --progress-bar on -r requirements.txt
  cp requirements.txt "$stamp"
else
  step "requirements.txt: installed already"
fi

# The package, editable, without the extension (built in place below).
if ! .venv/bin/python -m pip show -q surgellm_kernels >/dev/null 2>&1; then
  step "installing surgellm_kernels (editable)"
  SURGELLM_SKIP_EXTENSION=1 .venv/bin/python -m pip install -q --no-deps \
    --no-build-isolation -e .
fi

# The extension: rebuilt when its sources, setup.py or torch changed. The
# build directory keeps the objects, so only what changed compiles again.
inputs=$( (find csrc -type f | sort | xargs cat; cat setup.py;
           .venv/bin/python -c "import torch; print(torch.__version__)") | sha256sum)
built=build/.surgellm-extension
if ls surgellm_kernels/_C*.so >/dev/null 2>&1 && [ -f "$built" ] \
    && [ "$(cat "$built")" = "$inputs" ]; then
  step "C++ extension: up to date"
else
  step "building the C++ extension (the first time: a few minutes on 2 cores)"
  # one line per compiled file (ninja's, and the CPU kernels' per capability)
  .venv/bin/python setup.py -q build_ext --inplace 2>&1 \
    | sed -E 's#^\[([0-9]+/[0-9]+)\] .* -c ([^ ]+) -o .*#[\1] \2#' \
    | grep -E "^\[|error" | grep -v "torch/include" || true
  ls surgellm_kernels/_C*.so >/dev/null
  mkdir -p build && echo "$inputs" >"$built"
fi

.venv/bin/python -c "import sys, surgellm_kernels.ops._backend as b
print(f'== bootstrap: ready in {sys.argv[1]} s; backends: {b.summary()}')" "$((SECONDS - start))"
