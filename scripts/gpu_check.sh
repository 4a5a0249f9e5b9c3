#!/usr/bin/env bash
# The GPU check, in one command, for a CUDA machine that already has torch and
# Triton (and transformers) installed and no network:
#
#     bash scripts/gpu_check.sh OUT_DIR
#
# Steps, in this order (the figures first, so that a short lease still
# measures them):
#   build            the extension with its CUDA kernels, in place, for this
#                    GPU's architecture (setup.py build_ext: nothing installed)
#   backends         the cuda and triton backends must load; without them the
#                    check stops here
#   bench-goal       the memory-wall cases (4096 and 32768 x 768, float32 and
#                    bfloat16: IWN training forward + backward, the gate
#                    forward and forward + backward, each next to a
#                    device-to-device copy of its ideal bytes, F.layer_norm
#                    beside the gate)
#   bench-batchnorm  class-balanced BatchNorm (IWN2d) at (64, 256, 28, 28) and
#                    (256, 64, 56, 56), contiguous and channels_last, against
#                    F.batch_norm
#   tests-cuda       the kernel and module tests that run on the GPU
#   tests-triton     (SURGELLM_BACKEND=cuda, then =triton; CPU-only test
#                    modules are left to CI)
#   memcheck-cuda    compute-sanitizer memcheck over every CUDA C++ kernel
#   bench-quick-half the op benchmarks in float16 and bfloat16, quick mode
# Also available, not run by default: racecheck-cuda, memcheck-triton,
# racecheck-triton. SURGELLM_GPU_CHECK_STEPS="bench-goal tests-cuda" (say)
# runs the steps named, in the order above, after the build.
#
# Each step runs under its own time limit, and all of them within
# SURGELLM_GPU_CHECK_SECONDS (500 s), which the limits add up to more than: a
# step the budget leaves out is marked skipped in summary.json, for a second
# call with SURGELLM_GPU_CHECK_STEPS naming it. A step stopped at its limit
# gets SIGINT first, so pytest still prints (and saves) what it measured, and every
# benchmark row is appended to a file as it is measured. A failed step does
# not stop the others, except the build and the backends. OUT_DIR receives
# three files, rewritten after every step: summary.json (per step: state,
# exit code, seconds), tables.txt (the benchmark tables and rows) and
# logs.tar.gz (every log). The exit code is 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="${SURGELLM_GPU_CHECK_WORK:-/tmp/gpu_check}"
rm -rf "$work" && mkdir -p "$work"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SURGELLM_BACKEND=  # each step sets its own
budget="${SURGELLM_GPU_CHECK_SECONDS:-500}"  # all steps together
selected=" build backends ${SURGELLM_GPU_CHECK_STEPS:-bench-goal bench-batchnorm tests-cuda tests-triton memcheck-cuda bench-quick-half} "
steps=()
failed=0
complete=true

# The three files of OUT_DIR, from what the steps have left in $work so far.
publish() {
  {
    local environment=null
    [ -s "$work/environment.json" ] && environment="$(cat "$work/environment.json")"
    echo "{\"environment\": $environment,"
    echo " \"seconds\": $SECONDS, \"passed\": $([ $failed -eq 0 ] && echo true || echo false),"
    echo " \"complete\": $complete, \"steps\": ["
    (IFS=,; echo "${steps[*]}")
    echo "]}"
  } >"$out/summary.json"
  {
    for log in "$work"/bench-*.log; do
      [ -f "$log" ] || continue
      echo "#### $(basename "$log" .log)"
      sed -n '/benchmark report/,$p' "$log"
    done
    for rows in "$work"/bench-*.rows.jsonl; do
      [ -f "$rows" ] || continue
      echo "#### $(basename "$rows" .rows.jsonl): rows as measured"
      cat "$rows"
    done
  } >"$out/tables.txt"
  tar -czf "$out/logs.tar.gz" -C "$work" . 2>/dev/null
}

# record NAME STATE RC SECONDS: STATE is passed, failed, timed out or skipped.
record() {
  steps+=("{\"step\": \"$1\", \"state\": \"$2\", \"rc\": $3, \"seconds\": $4}")
  case "$2" in
    passed) ;;
    skipped) complete=false ;;
    *) failed=1 ;;
  esac
  publish
}

# run NAME LIMIT_SECONDS COMMAND...: the step, if selected, within its limit
# and what is left of the budget, logged to $work/NAME.log.
run() {
  local name="$1" limit="$2"
  shift 2
  case "$selected" in *" $name "*) ;; *) return 0 ;; esac
  local left=$((budget - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, the time budget (${budget}s) is spent"
    record "$name" skipped null 0
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout -s INT --kill-after=15 "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start)) state=passed
  [ $rc -ne 0 ] && state=failed
  # timeout's own codes (SIGINT, then SIGKILL after --kill-after)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state="timed out"; fi
  grep -E "error|Error|FAILED|passed|failed" "$work/$name.log" | tail -n 8
  echo "-> $state (rc $rc) in ${took}s"
  record "$name" "$state" $rc $took
  [ "$state" = passed ]
}

"$PYTHON" - >"$work/environment.json" <<'EOF'
import json, platform, torch
def version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "capability": "%d.%d" % torch.cuda.get_device_capability()
                  if torch.cuda.is_available() else None,
                  "triton": version("triton"), "transformers": version("transformers")}))
EOF
cat "$work/environment.json"
cc="$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["capability"] or "")' \
  <"$work/environment.json" 2>/dev/null)"
if [ -z "$cc" ]; then
  echo "no CUDA device visible to torch (or torch does not import)"
  record environment failed 1 0
  exit 1
fi

run build 300 env TORCH_CUDA_ARCH_LIST="$cc" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PYTHON" setup.py build_ext --inplace || exit 1
run backends 60 "$PYTHON" -c '
import torch, surgellm_kernels as sk
status = sk.backends(torch.device("cuda"))
for name, s in status.items():
    print(name, "available" if s.available else f"unavailable: {s.reason}")
assert status["cuda"].available and status["triton"].available, "a GPU backend is missing"' \
  || exit 1

bench_args=(--benchmark-only -q -p no:cacheprovider)
bench() {  # bench NAME LIMIT ENV... -- PYTEST ARGS...
  local name="$1" limit="$2"
  shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  run "$name" "$limit" env SURGELLM_BENCH_DEVICES=cuda SURGELLM_BENCH_ROWS="$work/$name.rows.jsonl" \
    "${envs[@]}" "$PYTHON" -m pytest "$@" "${bench_args[@]}" --results-dir "$work/$name"
}
# the memory-wall shapes of scripts/memory_wall.py: the fused kernels and the
# references that set the floor only
bench bench-goal 100 SURGELLM_BENCH_SHAPES=4096x768,32768x768 SURGELLM_BENCH_DTYPES=float32,bfloat16 -- \
  benchmarks/test_fused_iwn.py benchmarks/test_fused_surgical_gate.py \
  -k "((test_fused_iwn and train_fwd_bwd) or (test_fused_surgical_gate and not test_surgical_gate_module and (eval or train_fwd_bwd))) and not compile and not eager"
bench bench-batchnorm 60 SURGELLM_BENCH_DTYPES=float32,bfloat16 -- \
  benchmarks/test_iwn_batchnorm.py -k "not eager"

# -v: each test's name as it runs (a crash shows where); -rfE: the failures'
# names and messages in the summary. pytest-xdist, where installed, spreads
# the tests over 4 processes (a process that crashes is reported as its
# test's failure, the rest go on); pytest-timeout, where installed, stops a
# hung test. The modules left out test CPU tensors only (CI runs them).
test_args=(tests/ops tests/nn -p no:cacheprovider -v --tb=short -rfE
  -k "not test_ddp_example_runs_with_torchrun")
for module in test_cpu_builds test_compile test_large_inputs test_memory_wall_script \
  test_output_cache test_reference test_validation test_triton_gpu_compile \
  test_triton_gpu_compile_surgical_gate; do
  test_args+=(--ignore "tests/ops/$module.py")
done
test_args+=(--ignore tests/nn/test_patching.py)
if "$PYTHON" -c "import xdist" 2>/dev/null; then test_args+=(-n 4); fi
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then test_args+=(--timeout 90); fi
for backend in cuda triton; do
  run "tests-$backend" 120 env SURGELLM_BACKEND="$backend" "$PYTHON" -m pytest "${test_args[@]}" \
    --junitxml="$work/tests-$backend.xml"
done

sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
# Without the caching allocator, each tensor is its own allocation: an
# overrun past a tensor is seen, not hidden inside a larger cached block.
for backend in cuda triton; do
  for tool in memcheck racecheck; do
    run "$tool-$backend" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$sanitizer" --tool "$tool" --error-exitcode 3 \
      "$PYTHON" scripts/call_every_kernel.py --device cuda --backend "$backend" \
      --dtypes float32 bfloat16 --widths 1 65 1023
  done
done

bench bench-quick-half 90 SURGELLM_BENCH_QUICK=1 SURGELLM_BENCH_DTYPES=float16,bfloat16 -- \
  benchmarks/test_fused_iwn.py benchmarks/test_fused_surgical_gate.py -k "not compile"

echo "== summary: $out/summary.json (${SECONDS}s)"
cat "$out/summary.json"
exit $failed
