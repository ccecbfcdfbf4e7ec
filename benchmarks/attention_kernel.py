"""Micro-benchmark of the CUDA attention kernel at the Qwen3-8B shape (32 q heads, 8 kv heads, head_dim
128, 36 layers), bf16.

Each measurement replays a CUDA graph of one call per layer, each layer with its own cache, so short
contexts are not served from L2 and launch gaps are those of the engine's captured graphs. "context"
is the number of keys the last row sees (cache_len + rows). Bandwidth counts the K and V bytes of those
keys once (the floor: every live key read once per layer) and is compared with a measured device copy.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import orthrus_ext

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 36


def time_graph(graph, replays):
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # microseconds
    return statistics.median(times)


def capture(calls):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls()  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            calls()
    torch.cuda.synchronize()
    return graph


def copy_bandwidth(warm_up_seconds=0.0):
    """Device copy bandwidth (bytes read + written); with warm_up_seconds, first keeps the GPU busy that
    long so that its clocks have ramped up before anything is timed (an idle H100 sits at a low clock)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    graph = capture(lambda: target.copy_(source))
    start = time.perf_counter()
    while time.perf_counter() - start < warm_up_seconds:
        graph.replay()
        torch.cuda.synchronize()
    microseconds = time_graph(graph, 20)
    return 2 * source.numel() / (microseconds * 1e-6) / 1e9


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
    copy = copy_bandwidth(warm_up_seconds=2.0)
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
                graph = capture(calls)
                passes = [time_graph(graph, args.replays) / LAYERS for _ in range(args.passes)]
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
        return time_graph(capture(calls), replays) / LAYERS
    except RuntimeError:
        return float("nan")


if __name__ == "__main__":
    main()
