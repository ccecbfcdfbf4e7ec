#!/bin/bash
# On the device machine: builds orthrus_ext, runs the attention / norm / accept / fused-linear GPU tests, the
# compute-sanitizer driver (memcheck, racecheck) and the attention micro-benchmark. Logs go to $OUT;
# a short summary is printed last. Usage (repository root, .whl carried): bash tests/gpu/run_device.sh
set -u
OUT=${OUT:-/tmp/orthrus_device}
mkdir -p "$OUT"
summary=()
note() { summary+=("$1"); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "CUTLASS wheel install failed"; exit 1; }
export PYTHONPATH=$PWD:$PWD/csrc:/tmp/site PYTHONUNBUFFERED=1  # csrc/: orthrus_ext built in place
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1

start=$(date +%s)
if ! MAX_JOBS=16 ORTHRUS_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -30
  echo "BUILD FAILED (log: build.log)"; exit 1
fi
note "build: ok in $(( $(date +%s) - start )) s"
grep -E "registers|spill" "$OUT/build.log" > "$OUT/ptxas.txt" 2>/dev/null

start=$(date +%s)
timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -x \
  tests/gpu/test_attention_cuda.py tests/gpu/test_norm_accept_cuda.py tests/gpu/test_fused_linear_cuda.py \
  > "$OUT/pytest.log" 2>&1
note "pytest: rc $? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/pytest.log")"

for tool in memcheck racecheck; do
  start=$(date +%s)
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 python3 tests/gpu/sanitize_kernels.py \
    > "$OUT/sanitizer_$tool.log" 2>&1
  note "compute-sanitizer $tool: rc $? in $(( $(date +%s) - start )) s: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard" "$OUT/sanitizer_$tool.log" | tail -1)"
done

timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/attention_kernel.py > "$OUT/bench.log" 2>&1
note "benchmark: rc $?"

echo "==== pytest failures (if any)"
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/pytest.log" | head -20
echo "==== $(cat "$OUT/gpu.txt" | tail -1)"
printf '%s\n' "${summary[@]}"
cat "$OUT/bench.log"
