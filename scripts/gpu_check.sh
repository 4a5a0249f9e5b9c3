#!/usr/bin/env bash
# The GPU check, in one command, for a CUDA machine that already has torch and
# Triton (and transformers) installed and no network:
#
#     bash scripts/gpu_check.sh OUT_DIR
#
# 1. builds the extension with its CUDA kernels in place, for this GPU's
#    architecture (pip --no-build-isolation --no-deps: nothing is installed);
# 2. runs the kernel and module tests (tests/ops, tests/nn) with
#    SURGELLM_BACKEND=cuda, then =triton;
# 3. runs compute-sanitizer memcheck and racecheck over
#    scripts/call_every_kernel.py, once per backend;
# 4. runs the op benchmarks on CUDA tensors in quick mode in float16 and
#    bfloat16, and the memory-wall cases (4096 and 32768 x 768, float32 and
#    bfloat16: IWN forward + backward, the gate forward and forward +
#    backward), each next to a device-to-device copy of its ideal bytes; and class-balanced BatchNorm (IWN2d) at the shapes of
#    benchmarks/test_iwn_batchnorm.py against F.batch_norm;
# and writes OUT_DIR/summary.json (each step: exit code, seconds, log file)
# with the logs and benchmark tables next to it. Every step runs under a
# time limit and all of them within SURGELLM_GPU_CHECK_SECONDS (470 s), so
# the whole stays under 8 minutes; a step that fails does not stop the
# others (one left without time is recorded as skipped); the exit code is 1
# if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
PYTHON="${PYTHON:-python3}"
export SURGELLM_BACKEND=  # each step sets its own
steps=()

budget="${SURGELLM_GPU_CHECK_SECONDS:-470}"  # all steps together

# record NAME RC SECONDS TIMED_OUT LOG
record() {
  steps+=("{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3, \"timed_out\": $4, \"log\": $5}")
}

# run NAME LIMIT_SECONDS COMMAND...: runs the step within its limit and what
# is left of the budget, logs it, records it.
run() {
  local name="$1" limit="$2"
  shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, the time budget (${budget}s) is spent"
    record "$name" 125 0 true null
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  tail -n 5 "$out/$name.log"
  echo "-> rc $rc in ${took}s"
  local timed_out=false
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then timed_out=true; fi
  record "$name" $rc $took $timed_out "\"$name.log\""
}

cc="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || {
  echo "no CUDA device visible to torch"; exit 1; }
"$PYTHON" - >"$out/environment.json" <<'EOF'
import json, platform, torch
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = None
try:
    import transformers; transformers_version = transformers.__version__
except ImportError:
    transformers_version = None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
                  "capability": "%d.%d" % torch.cuda.get_device_capability(),
                  "triton": triton_version, "transformers": transformers_version}))
EOF
cat "$out/environment.json"

run build 300 env TORCH_CUDA_ARCH_LIST="$cc" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
run backends 60 "$PYTHON" -c '
import torch, surgellm_kernels as sk
status = sk.backends(torch.device("cuda"))
for name, s in status.items():
    print(name, "available" if s.available else f"unavailable: {s.reason}")
assert status["cuda"].available and status["triton"].available, "a GPU backend is missing"'

# -v: each test's name as it runs (a crash shows where); -rfE: the failures'
# names and messages in the summary.
# pytest-xdist, where installed, spreads the tests over 4 processes (and a
# process that crashes is reported as its test's failure, the rest go on).
pytest_args=(-p no:cacheprovider)
test_args=(-v --tb=short -rfE)
if "$PYTHON" -c "import xdist" 2>/dev/null; then test_args+=(-n 4); fi
run tests-cuda 150 env SURGELLM_BACKEND=cuda "$PYTHON" -m pytest tests/ops tests/nn "${pytest_args[@]}" "${test_args[@]}" \
  --junitxml="$out/tests-cuda.xml"
run tests-triton 150 env SURGELLM_BACKEND=triton "$PYTHON" -m pytest tests/ops tests/nn "${pytest_args[@]}" "${test_args[@]}" \
  --junitxml="$out/tests-triton.xml"

if command -v compute-sanitizer >/dev/null; then
  sanitizer=compute-sanitizer
elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
  sanitizer="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
else
  sanitizer=""
fi
if [ -n "$sanitizer" ]; then
  for backend in cuda triton; do
    for tool in memcheck racecheck; do
      run "$tool-$backend" 45 "$sanitizer" --tool "$tool" --error-exitcode 3 \
        "$PYTHON" scripts/call_every_kernel.py --device cuda --backend "$backend" \
        --dtypes float32 bfloat16 --widths 1 65 1023
    done
  done
else
  echo "compute-sanitizer not found"
  record compute-sanitizer 127 0 false null
fi

run bench-quick-half 90 env SURGELLM_BENCH_DEVICES=cuda SURGELLM_BENCH_QUICK=1 SURGELLM_BENCH_DTYPES=float16,bfloat16 \
  "$PYTHON" -m pytest benchmarks/test_fused_iwn.py benchmarks/test_fused_surgical_gate.py \
  --benchmark-only -q "${pytest_args[@]}" --results-dir "$out/bench-quick-half"
# the memory-wall shapes of scripts/memory_wall.py (fused kernels and the
# references that set the floor only): IWN training and the
# gate forward and forward + backward, each with its floor (the copy of its
# ideal bytes) and F.layer_norm beside the gate
run bench-goal 120 env SURGELLM_BENCH_DEVICES=cuda SURGELLM_BENCH_SHAPES=4096x768,32768x768 \
  SURGELLM_BENCH_DTYPES=float32,bfloat16 \
  "$PYTHON" -m pytest benchmarks/test_fused_iwn.py benchmarks/test_fused_surgical_gate.py \
  -k "((fused_iwn and train_fwd_bwd) or (test_fused_surgical_gate and (eval or train_fwd_bwd))) and not compile and not eager" \
  --benchmark-only -q "${pytest_args[@]}" --results-dir "$out/bench-goal"

# class-balanced BatchNorm at (64, 256, 28, 28) and (256, 64, 56, 56),
# contiguous and channels_last, against F.batch_norm on the same tensor
run bench-batchnorm 90 env SURGELLM_BENCH_DEVICES=cuda SURGELLM_BENCH_DTYPES=float32,bfloat16 \
  "$PYTHON" -m pytest benchmarks/test_iwn_batchnorm.py \
  --benchmark-only -q "${pytest_args[@]}" --results-dir "$out/bench-batchnorm"

# The benchmark tables (the reports' last sections) next to the summary.
for bench in bench-quick-half bench-goal bench-batchnorm; do
  sed -n '/benchmark report/,$p' "$out/$bench.log" >"$out/$bench-tables.txt"
done

failed=0
for s in "${steps[@]}"; do
  case "$s" in *'"rc": 0,'*) ;; *) failed=1 ;; esac
done
{
  echo "{\"environment\": $(cat "$out/environment.json"), \"seconds\": $SECONDS, \"passed\": $([ $failed -eq 0 ] && echo true || echo false), \"steps\": ["
  printf '%s\n' "$(IFS=,; echo "${steps[*]}")"
  echo "]}"
} >"$out/summary.json"
echo "== summary: $out/summary.json (${SECONDS}s)"
cat "$out/summary.json"
exit $failed
