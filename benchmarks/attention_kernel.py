"""Micro-benchmark of the CUDA attention kernel at the Qwen3-8B shape (32 q heads, 8 kv heads, head_dim
128, 36 layers), bf16.

Each measurement replays a CUDA graph of one call per layer, each layer with its own cache, so short
contexts are not served from L2 and launch gaps are those of the engine's captured graphs. "context"
is the number of keys the last row sees (cache_len + rows). Bandwidth counts the K and V bytes of those
keys once (the floor: every live key read once per layer) and is compared with a measured device copy.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import orthrus_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.timing import capture_graph, copy_bandwidth, graph_replay_ms  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 36


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--passes", type=int, default=2, help="time every case this often (shows the spread)")
    args = parser.parse_args()

    capacity = max(args.contexts) + 64
    shape = (LAYERS, capacity, KV_HEADS, HEAD_DIM)
    k_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    for layer in range(LAYERS):  # random data: zeros can run faster than real data
        k_cache[layer].normal_()
        v_cache[layer].normal_()
    scale = 1.0 / math.sqrt(HEAD_DIM)
    copy = copy_bandwidth(torch.device("cuda"), 1 << 30, 20, warm_up_seconds=2.0)["bytes_per_second"] / 1e9
    print(f"device {torch.cuda.get_device_name()}, device copy {copy:.0f} GB/s (read + write)")
    print(f"{'context':>8} {'rows':>4} {'mode':>13} {'us/layer':>9} {'GB/s':>7} {'of copy':>7}  "
          f"{'all passes us':>20}  {'torch sdpa us':>13}")
    for context in args.contexts:
        for rows in args.rows:
            cache_len = torch.tensor([context - rows], dtype=torch.int32, device="cuda")
            q = torch.randn(LAYERS, rows, Q_HEADS, HEAD_DIM, device="cuda").to(torch.bfloat16)
            k_block = torch.randn(rows, KV_HEADS, HEAD_DIM, device="cuda").to(torch.bfloat16)
            v_block = torch.randn_like(k_block, dtype=torch.float32).to(torch.bfloat16)
            key_bytes = context * KV_HEADS * HEAD_DIM * 2 * 2
            for causal in (True, False):
                def calls():
                    for layer in range(LAYERS):
                        orthrus_ext.attention(q[layer], k_cache[layer], v_cache[layer], cache_len,
                                              None if causal else k_block, None if causal else v_block,
                                              causal, scale)
                graph = capture_graph(calls)
                passes = [graph_replay_ms(graph, args.replays) * 1e3 / LAYERS for _ in range(args.passes)]
                per_layer = min(passes)
                bandwidth = key_bytes / (per_layer * 1e-6) / 1e9
                sdpa = ""
                if causal:
                    sdpa = f"{sdpa_time(q, k_cache, v_cache, context, rows, scale, args.replays):13.1f}"
                mode = "causal" if causal else "bidirectional"
                spread = " ".join(f"{t:.1f}" for t in passes)
                print(f"{context:8d} {rows:4d} {mode:>13} {per_layer:9.1f} {bandwidth:7.0f} "
                      f"{bandwidth / copy * 100:6.0f}%  {spread:>20}  {sdpa}")


def sdpa_time(q, k_cache, v_cache, context, rows, scale, replays):
    """torch's fused attention on the same keys, for scale only (it is not row-invariant)."""
    keys = [k_cache[layer, :context].transpose(0, 1) for layer in range(LAYERS)]
    values = [v_cache[layer, :context].transpose(0, 1) for layer in range(LAYERS)]
    queries = [q[layer].transpose(0, 1) for layer in range(LAYERS)]
    mask = torch.ones(rows, context, dtype=torch.bool, device="cuda").tril(diagonal=context - rows)

    def calls():
        for layer in range(LAYERS):
            F.scaled_dot_product_attention(queries[layer], keys[layer], values[layer], attn_mask=mask,
                                           scale=scale, enable_gqa=True)
    try:
        return graph_replay_ms(capture_graph(calls), replays) * 1e3 / LAYERS
    except RuntimeError:
        return float("nan")


if __name__ == "__main__":
    main()
