#!/usr/bin/env bash
# Builds the C++ extension with AddressSanitizer and UndefinedBehaviorSanitizer
# into build/sanitize (the package copied there, so the usual build is not
# touched) and runs the CPU tests of the kernels under them: the ops against
# the reference, bad inputs, failed calls, the property-based profile.
# Any report fails the run (halt_on_error). Needs ./.venv (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/sanitize
rm -rf "$out/lib"
mkdir -p "$out/lib"
cp -r surgellm_kernels "$out/lib/"
find "$out/lib" -name "_C*.so" -delete
SURGELLM_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" .venv/bin/python setup.py -q build_ext \
  --build-lib "$out/lib" --build-temp "$out/tmp" >"$out/build.log" 2>&1 || {
  tail -50 "$out/build.log"; echo "sanitizer build failed"; exit 1; }

# Python itself is not instrumented: the ASan runtime must be loaded first,
# and libstdc++ with it (else ASan's __cxa_throw interceptor finds no real
# __cxa_throw, and the first C++ exception aborts).
export LD_PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)"
# Leaks: CPython and torch keep allocations for the life of the process.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:new_delete_type_mismatch=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# tests/ for the tests' helper modules (importlib mode adds nothing to sys.path)
export PYTHONPATH="$PWD/$out/lib:$PWD/tests"
.venv/bin/python -P - <<'PY'
import surgellm_kernels._C as C
assert "/build/sanitize/" in C.__file__, f"not the sanitizer build: {C.__file__}"
print("sanitizer build:", C.__file__)
PY
# -P and --import-mode=importlib: neither the working directory nor the
# repository root (conftest.py) may put the usual build ahead of the
# sanitizer build's copy of the package.
.venv/bin/python -P -m pytest --import-mode=importlib -p no:cacheprovider -q \
  tests/ops/test_fused_iwn.py tests/ops/test_fused_surgical_gate.py tests/ops/test_iwn_ops.py \
  tests/ops/test_validation.py tests/ops/test_reliability.py tests/ops/test_properties.py \
  -k "not triton" "$@"
echo "sanitizers: no reports"
