"""A small driver for compute-sanitizer (memcheck, racecheck): every CUDA kernel of this directory's
tests once or twice at small shapes that still cross chunk, tile and warp edges. Run as
`compute-sanitizer --tool memcheck python tests/gpu/sanitize_kernels.py`; it exits non-zero if a result
is wrong, and the sanitizer reports any invalid access or shared-memory race."""

import math

import torch

import orthrus_ext


def main():
    torch.manual_seed(0)
    device = "cuda"
    for dtype, head_dim, q_heads, kv_heads in ((torch.bfloat16, 128, 32, 8), (torch.float16, 64, 16, 2)):
        for causal in (True, False):
            rows, cache_len, capacity = 33, 1000, 1040  # two chunks, a partial last tile, two vector tiles
            k_cache = torch.randn(capacity, kv_heads, head_dim, device=device).to(dtype)
            v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(dtype)
            q = torch.randn(rows, q_heads, head_dim, device=device).to(dtype)
            k_block = v_block = None
            if not causal:
                k_block = torch.randn(rows, kv_heads, head_dim, device=device).to(dtype)
                v_block = torch.randn_like(k_block, dtype=torch.float32).to(dtype)
            length = torch.tensor([cache_len], dtype=torch.int32, device=device)
            out = orthrus_ext.attention(q, k_cache, v_cache, length, k_block, v_block, causal,
                                        1 / math.sqrt(head_dim))
            if causal:
                single = orthrus_ext.attention(q[5:6].clone(), k_cache, v_cache, length + 5, None, None, True,
                                               1 / math.sqrt(head_dim))
                assert torch.equal(single[0], out[5])
            assert torch.isfinite(out).all()

        rows = 7
        x = torch.randn(rows, 4096 + 8, device=device).to(dtype)[:, :4096]
        y = orthrus_ext.rms_norm(x, torch.randn(4096, device=device).to(dtype), 1e-6)
        assert torch.isfinite(y).all()
        residual = x.contiguous()
        y = orthrus_ext.add_rms_norm(residual, torch.randn_like(residual), torch.randn(4096, device=device).to(dtype),
                                     1e-6)
        assert torch.isfinite(y).all()
        assert torch.isfinite(orthrus_ext.silu_mul(torch.randn(rows, 2 * 3000, device=device).to(dtype))).all()
        embeddings = torch.randn(1000, 4096, device=device).to(dtype)
        tokens = torch.randint(0, 1000, (rows,), device=device)
        x, y = orthrus_ext.embedding_rms_norm(tokens, embeddings, torch.ones(4096, device=device, dtype=dtype), 1e-6)
        assert torch.equal(x, embeddings[tokens]) and torch.isfinite(y).all()

        qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
        q = qkv[:, :q_heads * head_dim].view(rows, q_heads, head_dim)
        k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        v = qkv[:, (q_heads + kv_heads) * head_dim:].view(rows, kv_heads, head_dim)
        table = torch.randn(100, head_dim, device=device)
        k_dst = torch.zeros(20, kv_heads, head_dim, device=device, dtype=dtype)
        v_dst = torch.zeros_like(k_dst)
        start = torch.tensor([3], dtype=torch.int32, device=device)
        q_out = orthrus_ext.qk_norm_rope_store(q, k, v, torch.ones(head_dim, device=device, dtype=dtype),
                                               torch.ones(head_dim, device=device, dtype=dtype), table, start,
                                               k_dst, v_dst, start + 10, 1e-6)
        assert torch.isfinite(q_out).all() and torch.equal(v_dst[13:20], v)

        # The linear kernel's fused epilogues: clusters of whole heads, and SwiGLU tiles with a ragged end.
        x = torch.randn(rows, 512, device=device).to(dtype)
        weight = torch.randn((q_heads + 2 * kv_heads) * head_dim, 512, device=device).to(dtype)
        norm = torch.ones(head_dim, device=device, dtype=dtype)
        q_fused = orthrus_ext.linear_qk_norm_rope_store(x, weight, norm, norm, table, start, k_dst, v_dst, start + 10,
                                                        1e-6)
        assert torch.isfinite(q_fused).all() and torch.isfinite(k_dst[13:20]).all()
        gate_up = torch.randn(2 * 1000, 512, device=device).to(dtype)
        assert torch.equal(orthrus_ext.linear_silu_mul(x, gate_up),
                           orthrus_ext.silu_mul(orthrus_ext.linear(x, gate_up)))
        # The deferred norm: its producer with a ragged last tile, then both consumers staging its sums, at
        # 7 rows and at 1 (x resident).
        for count in (rows, 1):
            residual = torch.randn(count, 1000, device=device).to(dtype)
            output = torch.randn(1000, 512, device=device).to(dtype)
            weighted, square_sums = orthrus_ext.linear_add_deferred_norm(x[:count], output, residual,
                                                                         torch.ones(1000, device=device, dtype=dtype))
            assert torch.equal(weighted, residual) and torch.isfinite(square_sums).all()
            projection = torch.randn((q_heads + 2 * kv_heads) * head_dim, 1000, device=device).to(dtype)
            q_fused = orthrus_ext.linear_qk_norm_rope_store(weighted, projection, norm, norm, table, start, k_dst,
                                                            v_dst, start + 10, 1e-6, square_sums, 1e-6)
            gate_up_deferred = torch.randn(2 * 1000, 1000, device=device).to(dtype)
            activation = orthrus_ext.linear_silu_mul(weighted, gate_up_deferred, square_sums, 1e-6)
            assert torch.isfinite(q_fused).all() and torch.isfinite(activation).all()
        # linear_argmax: keys of a split-K cluster (2 ranks), a ragged last tile, and 7 rows, which leave a
        # half warp alone in the epilogue loop; then the reduction of the keys.
        vocab = torch.randn(1000, 512, device=device).to(dtype)
        assert torch.equal(orthrus_ext.linear_argmax(x, vocab), orthrus_ext.linear(x, vocab).argmax(-1))

        # One row group and a long K: all of x's 12 chunks staged at once (three commit groups), with and
        # without 16-byte copies (a row stride of 3001 elements is not 16-byte aligned).
        weight_long = torch.randn(300, 3000, device=device).to(dtype)
        for pitch in (3008, 3001):
            x_long = torch.randn(2, pitch, device=device).to(dtype)[:, :3000]
            out = orthrus_ext.linear(x_long, weight_long).float()
            reference = x_long.float() @ weight_long.float().T
            assert ((out - reference).norm() / reference.norm()).item() < 1e-2

    targets = torch.arange(40, device=device)
    drafts = targets[:39].clone()
    drafts[35] = -1
    cache_len = torch.tensor([10], dtype=torch.int32, device=device)
    emitted = torch.zeros(41, dtype=torch.int64, device=device)
    anchor = torch.zeros(1, dtype=torch.int64, device=device)
    orthrus_ext.accept(drafts, targets, cache_len, emitted, anchor)
    assert (cache_len.item(), emitted[0].item(), anchor.item()) == (46, 36, 35)
    assert torch.equal(emitted[1:], targets)
    torch.cuda.synchronize()
    print("sanitize driver: all kernels ran, results checked")


if __name__ == "__main__":
    main()
