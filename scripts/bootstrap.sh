#!/usr/bin/env bash
# Makes ./.venv with the pinned dependencies and builds the extension into it.
# Idempotent: a second run reuses the venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# No build isolation: compile against the torch installed above.
MAX_JOBS="${MAX_JOBS:-$(nproc)}" .venv/bin/python -m pip install --quiet \
  --disable-pip-version-check --no-build-isolation -e .
.venv/bin/python -c "import surgellm_kernels as sk; print('surgellm_kernels backends:', {k: v.available for k, v in sk.backends().items()})"
