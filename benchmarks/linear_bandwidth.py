"""Bandwidth of the row-invariant decode-phase linear kernel (csrc/cuda/linear.cu) next to cuBLAS.

For every decode-phase projection of Qwen3-1.7B / 4B / 8B and M in {1, 16, 32, 33, 64} rows it prints and
saves the kernel time and the achieved weight bandwidth (N*K*2 bytes per call), cuBLAS (torch F.linear)
at the same shape, the device-to-device copy bandwidth measured in the same run (bytes read + written),
and whether cuBLAS itself is row-invariant at that shape (each M-row result equal, bit for bit, to the
single-row results stacked) for M = 1..64. --sweep-splits also times every split-K cluster size of the
kernel (needs the standalone library, see load_linear).

The kernel comes from ORTHRUS_LINEAR_LIB (a shared library built from csrc/cuda/linear.cu plus a small
C shim, see tests/gpu/run_linear_device.sh) when that variable is set, else from orthrus_ext.linear.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.timing import capture_graph, copy_bandwidth, graph_replay_ms  # noqa: E402

QWEN3_SHAPES = {
    # name: (hidden, q_heads, kv_heads, head_dim, intermediate)
    "qwen3-1.7b": (2048, 16, 8, 128, 6144),
    "qwen3-4b": (2560, 32, 8, 128, 9728),
    "qwen3-8b": (4096, 32, 8, 128, 12288),
}
VOCAB = 151936
BENCH_ROWS = (1, 16, 32, 33, 64)
# Weight bytes the timed calls cycle through: several times the 50 MB L2, so weights come from HBM.
ROTATION_BYTES = 256 << 20


def model_projections() -> list[tuple[str, int, int]]:
    """(name, out_features N, in_features K) of every decode-phase projection of the Qwen3 models."""
    shapes = []
    for model, (hidden, q_heads, kv_heads, head_dim, intermediate) in QWEN3_SHAPES.items():
        shapes += [
            (f"{model}/qkv", (q_heads + 2 * kv_heads) * head_dim, hidden),
            (f"{model}/o", hidden, q_heads * head_dim),
            (f"{model}/gate_up", 2 * intermediate, hidden),
            (f"{model}/down", hidden, intermediate),
            (f"{model}/lm_head", VOCAB, hidden),
        ]
    return shapes


class _StandaloneLinear:
    """ctypes front end of the standalone library: orthrus_linear(...) wraps orthrus::linear_cuda and
    orthrus_linear_split(...) launches with an explicit split-K cluster size."""

    def __init__(self, path: str):
        self.library = ctypes.CDLL(path)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.library.orthrus_linear.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, i64, i64, ptr]
        self.library.orthrus_linear.restype = ctypes.c_int
        self.library.orthrus_linear_split.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, i64, i64, i64,
                                                      ctypes.c_int, ptr]
        self.library.orthrus_linear_split.restype = ctypes.c_int
        self.library.orthrus_linear_default_split.argtypes = [i64, i64]
        self.library.orthrus_linear_default_split.restype = ctypes.c_int

    @staticmethod
    def dtype_code(dtype: torch.dtype) -> int:
        # orthrus::DType
        return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]

    def call(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, split: int | None = None) -> int:
        """Raw call: returns the cudaError_t code, checks nothing itself."""
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        args = (x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0],
                weight.shape[1])
        if split is None:
            return self.library.orthrus_linear(self.dtype_code(x.dtype), *args, stream)
        return self.library.orthrus_linear_split(self.dtype_code(x.dtype), *args, split, stream)

    def default_split(self, out_features: int, in_features: int) -> int:
        return self.library.orthrus_linear_default_split(out_features, in_features)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                 split: int | None = None) -> torch.Tensor:
        if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.stride(1) != 1:
            raise ValueError(f"linear: x {tuple(x.shape)} / weight {tuple(weight.shape)} do not match")
        if out is None:
            out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        code = self.call(x, weight, out, split)
        if code != 0:
            raise RuntimeError(f"orthrus linear failed with cudaError_t {code}")
        return out


class _ExtensionLinear:
    def __init__(self):
        import orthrus_ext

        self.function = orthrus_ext.linear

    def __call__(self, x, weight, out=None, split=None):
        if split is not None:
            raise RuntimeError("orthrus_ext.linear has no split override; set ORTHRUS_LINEAR_LIB")
        result = self.function(x, weight)
        if out is not None:
            out.copy_(result)
            return out
        return result


def load_linear():
    """The kernel under test: the standalone library named by ORTHRUS_LINEAR_LIB, else orthrus_ext."""
    path = os.environ.get("ORTHRUS_LINEAR_LIB")
    return _StandaloneLinear(path) if path else _ExtensionLinear()


def time_per_call(function, calls_per_graph: int = 20, replays: int = 15) -> float:
    """Seconds per call: `function(i)` captured calls_per_graph times in one CUDA graph (no launch gaps),
    median over replays."""
    graph = capture_graph(lambda: [function(i) for i in range(calls_per_graph)])
    return graph_replay_ms(graph, replays) / 1e3 / calls_per_graph


def cublas_row_invariance(x: torch.Tensor, weight: torch.Tensor) -> list[int]:
    """Row counts M in 1..64 at which F.linear's M-row result differs, in any bit, from its single-row
    results stacked."""
    single = torch.cat([F.linear(x[m:m + 1], weight) for m in range(x.shape[0])])
    differing = []
    for rows in range(1, x.shape[0] + 1):
        block = F.linear(x[:rows], weight)
        if not torch.equal(block.view(torch.int16), single[:rows].view(torch.int16)):
            differing.append(rows)
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmark_results", help="folder for linear_bandwidth.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep-splits", action="store_true",
                        help="also time every split-K cluster size at M = 1 and 32 (standalone library only)")
    args = parser.parse_args()

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    linear = load_linear()
    copy = copy_bandwidth(device, 1 << 30, 20)["bytes_per_second"]
    properties = torch.cuda.get_device_properties(device)
    print(f"device {properties.name}, {properties.multi_processor_count} SMs; torch {torch.__version__}; "
          f"copy bandwidth {copy / 1e12:.3f} TB/s (read + write)", flush=True)

    generator = torch.Generator(device=device)
    generator.seed()
    results = []
    for name, out_features, in_features in model_projections():
        weight_bytes = out_features * in_features * 2
        copies = max(1, min(16, math.ceil(ROTATION_BYTES / weight_bytes)))
        weights = [torch.randn(out_features, in_features, device=device, dtype=dtype, generator=generator)
                   / math.sqrt(in_features) for _ in range(copies)]
        x = torch.randn(max(BENCH_ROWS), in_features, device=device, dtype=dtype, generator=generator)
        out = torch.empty(max(BENCH_ROWS), out_features, device=device, dtype=dtype)
        entry = {"name": name, "out_features": out_features, "in_features": in_features,
                 "weight_bytes": weight_bytes, "rows": {}}
        for rows in BENCH_ROWS:
            ours = time_per_call(lambda i: linear(x[:rows], weights[i % copies], out=out[:rows]))
            theirs = time_per_call(lambda i: torch.mm(x[:rows], weights[i % copies].t(), out=out[:rows]))
            entry["rows"][rows] = {
                "orthrus_seconds": ours, "orthrus_bandwidth": weight_bytes / ours,
                "orthrus_fraction_of_copy": weight_bytes / ours / copy,
                "cublas_seconds": theirs, "cublas_bandwidth": weight_bytes / theirs,
            }
        if args.sweep_splits and isinstance(linear, _StandaloneLinear):
            chunks = math.ceil(in_features / 256)
            entry["default_split"] = linear.default_split(out_features, in_features)
            entry["split_sweep"] = {}
            for rows in (1, 32):
                entry["split_sweep"][rows] = {
                    split: weight_bytes / time_per_call(
                        lambda i: linear(x[:rows], weights[i % copies], out=out[:rows], split=split))
                    for split in range(1, min(8, chunks) + 1)}
        entry["cublas_rows_differing"] = cublas_row_invariance(x, weights[0])
        results.append(entry)
        line = " ".join(f"M{r}={entry['rows'][r]['orthrus_fraction_of_copy']:.2f}" for r in BENCH_ROWS)
        print(f"{name:22s} {out_features:6d}x{in_features:<5d} {line} cublas-row-variant-M:"
              f"{len(entry['cublas_rows_differing'])}", flush=True)
        if "split_sweep" in entry:
            for rows, sweep in entry["split_sweep"].items():
                print(f"    split sweep M={rows} (default {entry['default_split']}): "
                      + " ".join(f"{s}:{b / 1e12:.2f}" for s, b in sweep.items()), flush=True)
        del weights

    os.makedirs(args.out, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "device": properties.name,
              "torch": torch.__version__, "dtype": args.dtype, "copy_bandwidth": copy, "shapes": results}
    with open(os.path.join(args.out, "linear_bandwidth.json"), "w") as handle:
        json.dump(report, handle, indent=1)

    print(f"\nweight bandwidth in TB/s (fraction of the {copy / 1e12:.2f} TB/s copy); cuBLAS next to it")
    print(f"{'shape':22s} {'N x K':>12s} " + " ".join(f"{'M=' + str(r):>18s}" for r in BENCH_ROWS)
          + "  cuBLAS row-variant at M")
    for entry in results:
        cells = []
        for rows in BENCH_ROWS:
            r = entry["rows"][rows]
            cells.append(f"{r['orthrus_bandwidth'] / 1e12:5.2f}({r['orthrus_fraction_of_copy']:.2f})"
                         f"/{r['cublas_bandwidth'] / 1e12:5.2f}")
        differing = entry["cublas_rows_differing"]
        shown = "none" if not differing else (f"{len(differing)}: {differing[:6]}" + ("..." if len(differing) > 6 else ""))
        print(f"{entry['name']:22s} {entry['out_features']:>6d}x{entry['in_features']:<5d} "
              + " ".join(f"{c:>18s}" for c in cells) + f"  {shown}")


if __name__ == "__main__":
    main()
