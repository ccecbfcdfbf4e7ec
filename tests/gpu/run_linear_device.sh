#!/usr/bin/env bash
# One device call for the linear kernel: build a standalone library from csrc/cuda/linear.cu (no torch
# headers, so it builds in seconds and does not wait for the full extension), check its SASS, run the GPU
# tests, compute-sanitizer on a small case, and the bandwidth benchmark. Logs go to $OUT (or ./linear_out);
# a short summary is printed last.
#   usage: tests/gpu/run_linear_device.sh [--no-bench] [--sweep-splits]
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-linear_out}
mkdir -p "$OUT"
BUILD=$(mktemp -d)
BENCH=1
BENCH_FLAGS=()
for arg in "$@"; do
  case "$arg" in
    --no-bench) BENCH=0 ;;
    --sweep-splits) BENCH_FLAGS+=(--sweep-splits) ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
summary=()

{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; nvcc --version | tail -1; } \
  2>&1 | tee "$OUT/device.txt"

# The C entry points the Python side reaches through ctypes (benchmarks/linear_bandwidth.py).
cat > "$BUILD/shim.cu" <<'EOF'
#include "linear.cuh"
extern "C" int orthrus_linear(int dtype, const void* x, int64_t stride, const void* w, void* y, int64_t rows,
                              int64_t n, int64_t k, void* stream) {
  return int(orthrus::linear_cuda(orthrus::DType(dtype), x, stride, w, y, rows, n, k, nullptr, 0,
                                  static_cast<cudaStream_t>(stream)));
}
extern "C" int orthrus_linear_split(int dtype, const void* x, int64_t stride, const void* w, void* y,
                                    int64_t rows, int64_t n, int64_t k, int split, void* stream) {
  return int(orthrus::cuda_detail::linear_cuda_with_split(orthrus::DType(dtype), x, stride, w, y, rows, n, k,
                                                          split, static_cast<cudaStream_t>(stream)));
}
extern "C" int orthrus_linear_default_split(int64_t n, int64_t k) {
  return orthrus::cuda_detail::linear_split_for_shape(n, k);
}
EOF
start=$(date +%s)
if nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo \
    -DORTHRUS_WITH_CUDA -I csrc/include -I csrc/cuda -Xptxas -v -Xcompiler -fPIC -shared \
    -o "$BUILD/liborthrus_linear.so" csrc/cuda/linear.cu "$BUILD/shim.cu" > "$OUT/build.log" 2>&1; then
  summary+=("build: ok in $(( $(date +%s) - start )) s; $(grep -c 'Used' "$OUT/build.log") kernels;" \
            "spills: $(grep -E 'spill (stores|loads)' "$OUT/build.log" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads')")
else
  tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
export ORTHRUS_LINEAR_LIB="$BUILD/liborthrus_linear.so"

cuobjdump --dump-sass "$ORTHRUS_LINEAR_LIB" > "$BUILD/sass.txt" 2>&1
summary+=("sass: HMMA $(grep -c HMMA "$BUILD/sass.txt"), HGMMA $(grep -c HGMMA "$BUILD/sass.txt"),"\
" LDL/STL $(grep -cE '\b(LDL|STL)\b' "$BUILD/sass.txt"), LDG.E.128 $(grep -cE 'LDG\.E.*128' "$BUILD/sass.txt")")
grep -E '^\s+Function|HMMA|LDG|LDS|LDL|STL' "$BUILD/sass.txt" | head -400 > "$OUT/sass_excerpt.txt"

export PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider --noconftest tests/gpu/test_linear_cuda.py > "$OUT/tests.log" 2>&1
summary+=("tests: $(tail -1 "$OUT/tests.log")")

compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider --noconftest \
  tests/gpu/test_linear_cuda.py -k sanitizer > "$OUT/memcheck.log" 2>&1
summary+=("memcheck: rc $? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)")
compute-sanitizer --tool racecheck --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider --noconftest \
  tests/gpu/test_linear_cuda.py -k sanitizer > "$OUT/racecheck.log" 2>&1
summary+=("racecheck: rc $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.log" | tail -1)")

if [ "$BENCH" = 1 ]; then
  python3 benchmarks/linear_bandwidth.py --out "$OUT" "${BENCH_FLAGS[@]}" > "$OUT/bench.log" 2>&1
  summary+=("benchmark: rc $?")
fi

grep -E 'passed|failed|Error|assert' "$OUT/tests.log" | tail -15
[ "$BENCH" = 1 ] && sed -n '/^weight bandwidth/,$p' "$OUT/bench.log" && grep 'split sweep' "$OUT/bench.log"
[ "$BENCH" = 1 ] && tail -3 "$OUT/bench.log"
printf '%s\n' "${summary[@]}"
