"""What a decode pass loses at its kernel boundaries, and what a persistent kernel would lose instead.

Builds benchmarks/phase_boundary.cu with nvcc and runs it with the byte counts of one decode pass of a
Qwen3 shape at batch 1: per layer, q|k|v, attention over `--context` cached keys, the attention merge's
partial states, the output projection, gate|up and down, then the lm_head. The same phases run as a
PDL kernel chain replayed from a CUDA graph (how the decode step runs), as the same chain with each kernel
waiting for a completion counter of the previous one instead of griddepcontrol.wait, as one persistent
kernel with a grid barrier between phases, as that kernel launched cooperatively with grid.sync() as its
barrier, as one persistent kernel per layer chained with PDL, and as the persistent kernel with its
barriers open (the bound). Prints and saves (--out/phase_boundary.json) each form's time and its fraction
of the device-to-device copy bandwidth measured in the same run, the definition the AR target uses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from harness.models import SHAPES, model_config  # noqa: E402
from harness.timing import copy_bandwidth  # noqa: E402
from orthrus.config import ModelConfig  # noqa: E402

SOURCE = ROOT / "benchmarks" / "phase_boundary.cu"
BF16_BYTES = 2
FLOAT_BYTES = 4
ATTENTION_SPLIT_KEYS = 128  # csrc/cuda/attention.cuh: kAttentionSplitKeys
FORMS = ("stream", "chain", "flags", "persistent", "cooperative", "layers")  # the bound first


def layer_phase_bytes(config: ModelConfig, context: int) -> list[int]:
    """Bytes each phase of one layer reads in a one-row bf16 pass at `context` cached keys: q|k|v (with the
    input norm and the q/k norms), the K/V cache, the merge's partial states (one per 128-key split:
    head_dim values and two statistics per q head), output, gate|up (with its norm), down."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    splits = -(-(context + 1) // ATTENTION_SPLIT_KEYS)
    return [
        ((q_heads + 2 * kv_heads) * head_dim * hidden + hidden + 2 * head_dim) * BF16_BYTES,
        2 * context * kv_heads * head_dim * BF16_BYTES,
        q_heads * splits * (head_dim + 2) * FLOAT_BYTES,
        hidden * q_heads * head_dim * BF16_BYTES,
        (2 * config.intermediate_size * hidden + hidden) * BF16_BYTES,
        hidden * config.intermediate_size * BF16_BYTES,
    ]


def lm_head_phase_bytes(config: ModelConfig) -> int:
    """The final norm and the lm_head."""
    return (config.vocab_size + 1) * config.hidden_size * BF16_BYTES


def build(workdir: str) -> str:
    binary = os.path.join(workdir, "phase_boundary")
    subprocess.run(["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a",
                    f"-I{ROOT / 'csrc' / 'cuda'}", str(SOURCE), "-o", binary], check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(name for name in SHAPES if name != "tiny"), default="8B")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmark_results", help="folder for phase_boundary.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if args.context < 0 or args.repeats < 1:
        parser.error("--repeats must be positive, --context not negative")

    config = model_config(args.model)
    phases = layer_phase_bytes(config, args.context)
    lm_head = lm_head_phase_bytes(config)
    copy = copy_bandwidth(torch.device("cuda"), 1 << 30, repeats=args.repeats, warm_up_seconds=1.0)
    with tempfile.TemporaryDirectory() as workdir:
        command = [build(workdir), str(config.num_hidden_layers), str(args.repeats)] + [str(b) for b in phases] + [str(lm_head)]
        run = subprocess.run(command, check=False, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"phase_boundary failed ({run.returncode}): {run.stdout}{run.stderr}")
    result = json.loads(run.stdout)
    floor_ms = result["bytes"] / copy["bytes_per_second"] * 1e3
    for form in FORMS:
        result[f"{form}_fraction_of_copy"] = floor_ms / result[f"{form}_ms"]
    result.update(model=args.model, layers=config.num_hidden_layers, context=args.context, layer_phase_bytes=phases,
                  lm_head_bytes=lm_head, copy_bandwidth=copy, floor_ms=floor_ms,
                  date=datetime.date.today().isoformat(), torch=torch.__version__)
    boundaries = result["phases"] - 1
    print(f"{result['device']}, {result['ctas']} CTAs, {result['phases']} phases, {result['bytes'] / 1e9:.2f} GB; "
          f"copy {copy['bytes_per_second'] / 1e9:.0f} GB/s, floor {floor_ms:.3f} ms")
    for form in FORMS:
        print(f"  {form:10s} {result[f'{form}_ms']:.3f} ms  {result[f'{form}_fraction_of_copy']:.1%} of copy")
    for form in FORMS[1:]:
        per_boundary = (result[f"{form}_ms"] - result["stream_ms"]) * 1e3 / boundaries
        result[f"{form}_us_per_boundary_over_stream"] = per_boundary
        print(f"  {form} costs {per_boundary:.2f} us per boundary over the stream")
    print(f"  the other forms' outputs equal the chain's: {result['outputs_match']}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "phase_boundary.json"), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
