"""CPU kernels of orthrus_ext against float64 references, bitwise row invariance, and argument checks.

Inputs and shapes are fresh random draws each run; the seed is printed (shown with a failure) and
ORTHRUS_TEST_SEED=<seed> replays it. Buffers the ops write into are poisoned with NaN first, and cache rows
an op must not read are NaN too, so a stray read or a missing write shows up.
"""

import math
import os
import random
import re

import pytest
import torch

import orthrus_ext as ext

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error allowed against the float64 reference, per storage dtype: the final rounding of the
# result (2^-11 for float16, 2^-8 for bfloat16) with room for the fp32 arithmetic before it.
RTOL = {torch.float32: 2e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}


@pytest.fixture
def gen():
    seed = int(os.environ.get("ORTHRUS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"ORTHRUS_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def randint(gen, low, high):
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def scalar(value, dtype=torch.int32):
    return torch.tensor([value], dtype=dtype)


def assert_close(actual, expected, dtype, magnitude):
    """|actual - expected| <= RTOL[dtype] * magnitude, elementwise (magnitude: the size of the terms)."""
    error = (actual.double() - expected).abs()
    bound = RTOL[dtype] * magnitude
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(error)
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (
        f"{dtype}: error {error.flatten()[worst]:.3g} exceeds {bound.flatten()[worst]:.3g}"
    )


def rows_view(gen, rows, width, dtype):
    """A [rows, width] view with a row stride larger than width, like a slice of a fused projection."""
    pad = randint(gen, 1, 9)
    return randn(gen, rows, width + pad, dtype=dtype)[:, pad:]


def rope_table(positions, head_dim, theta=1_000_000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


# ---------------------------------------------------------------------------------------------------------
# references (float64)


def reference_rms_norm(x, weight, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


def reference_rope(x, cos_sin):
    """x: [rows, heads, head_dim] float64; cos_sin: [rows, head_dim] float32."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin.double()[:, None, :half], cos_sin.double()[:, None, half:]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def reference_attention(q, keys, values, visible, scale):
    """q: [rows, q_heads, d]; keys/values: [n, kv_heads, d]; visible[m] = number of keys row m sees."""
    rows, q_heads, _ = q.shape
    group = q_heads // keys.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    magnitude = torch.empty(q.shape, dtype=torch.float64)
    for m in range(rows):
        k = keys[: visible[m]].double().repeat_interleave(group, dim=1)  # [n, q_heads, d]
        v = values[: visible[m]].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[m].double(), k) * scale
        probabilities = torch.softmax(scores, dim=-1)
        out[m] = torch.einsum("hn,nhd->hd", probabilities, v)
        magnitude[m] = torch.einsum("hn,nhd->hd", probabilities, v.abs())
    return out, magnitude


# ---------------------------------------------------------------------------------------------------------
# linear


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_reference(gen, dtype):
    rows, in_features, out_features = randint(gen, 1, 64), randint(gen, 1, 300), randint(gen, 1, 200)
    x = rows_view(gen, rows, in_features, dtype)
    weight = randn(gen, out_features, in_features, dtype=dtype)
    y = ext.linear(x, weight)
    assert y.shape == (rows, out_features) and y.dtype == dtype
    expected = x.double() @ weight.double().T
    assert_close(y, expected, dtype, x.double().abs() @ weight.double().abs().T)
    assert torch.equal(y, ext.linear(x.contiguous(), weight)), "the row stride of x changed the result"


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_row_invariant(gen, dtype):
    # Both tile shapes (one row, blocks) and both tails (in_features % 8, partial tiles) get exercised.
    in_features, out_features = randint(gen, 1, 200), randint(gen, 1, 70)
    x = rows_view(gen, 64, in_features, dtype)
    weight = randn(gen, out_features, in_features, dtype=dtype)
    full = ext.linear(x, weight)
    for rows in range(1, 65):
        assert torch.equal(ext.linear(x[:rows], weight), full[:rows]), f"rows={rows}"
    for m in range(64):
        assert torch.equal(ext.linear(x[m : m + 1], weight), full[m : m + 1]), f"row {m} alone"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_rounds_like_torch(gen, dtype):
    """Narrow dtypes run the fp32 path on exactly widened inputs, then round to nearest even like torch,
    including overflow to infinity and subnormals."""
    rows, in_features, out_features = randint(gen, 1, 20), randint(gen, 1, 40), randint(gen, 1, 40)
    x = randn(gen, rows, in_features, dtype=dtype)
    # Weights from (sub)normal tiny to large enough that float16 results overflow, none infinite.
    low, high = (-24, 12) if dtype == torch.float16 else (-130, 100)
    exponents = torch.randint(low, high + 1, (out_features, 1), generator=gen).double()
    weight = (randn(gen, out_features, in_features).double() * 2.0**exponents).to(dtype)
    narrow = ext.linear(x, weight)
    wide = ext.linear(x.float(), weight.float())
    assert torch.equal(narrow, wide.to(dtype))


def test_same_bits_for_any_thread_count(gen):
    x = randn(gen, 33, 256)
    weight = randn(gen, 515, 256)
    q, k_cache, v_cache, cache_len, scale = attention_setup(gen, torch.float32, 40, head_dim=64)
    threads = torch.get_num_threads()

    def run():
        return (ext.linear(x, weight),
                ext.attention(q, k_cache, v_cache, scalar(cache_len), None, None, True, scale))

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(4, threads))
        for one, many in zip(single, run()):
            assert torch.equal(one, many)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference_and_is_row_invariant(gen, dtype):
    dim = randint(gen, 1, 300)
    x = rows_view(gen, 64, dim, dtype)
    weight = randn(gen, dim, dtype=dtype)
    eps = 1e-6
    full = ext.rms_norm(x, weight, eps)
    expected = reference_rms_norm(x, weight, eps)
    assert_close(full, expected, dtype, expected.abs() + 1e-3)
    for rows in range(1, 65):
        assert torch.equal(ext.rms_norm(x[:rows], weight, eps), full[:rows]), f"rows={rows}"
    assert torch.equal(ext.rms_norm(x[5:6], weight, eps), full[5:6])
    if dtype != torch.float32:
        assert torch.equal(full, ext.rms_norm(x.float(), weight.float(), eps).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_and_normalises_it(gen, dtype):
    dim = randint(gen, 1, 300)
    x = randn(gen, 64, dim, dtype=dtype)
    delta = randn(gen, 64, dim, dtype=dtype)
    weight = randn(gen, dim, dtype=dtype)
    eps = 1e-6
    residual = x.clone()
    full = ext.add_rms_norm(residual, delta, weight, eps)
    assert torch.equal(residual, x + delta)
    assert torch.equal(full, ext.rms_norm(x + delta, weight, eps))
    for rows in (1, 7, 33):
        part = x[:rows].clone()
        assert torch.equal(ext.add_rms_norm(part, delta[:rows], weight, eps), full[:rows]), f"rows={rows}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_rms_norm_gathers_and_normalises(gen, dtype):
    vocab, dim = randint(gen, 1, 500), randint(gen, 1, 300)
    table = randn(gen, vocab, dim, dtype=dtype)
    weight = randn(gen, dim, dtype=dtype)
    tokens = torch.randint(0, vocab, (64,), generator=gen)
    x, y = ext.embedding_rms_norm(tokens, table, weight, 1e-6)
    assert torch.equal(x, table[tokens])
    assert torch.equal(y, ext.rms_norm(table[tokens], weight, 1e-6))
    for rows in (1, 9, 40):
        assert torch.equal(ext.embedding_rms_norm(tokens[:rows], table, weight, 1e-6)[1], y[:rows]), f"rows={rows}"


@pytest.mark.parametrize("token", [-1, 50])
def test_embedding_rms_norm_rejects_a_token_outside_the_table(token):
    with pytest.raises(ValueError, match=rf"tokens\[1\] = {token} is outside"):
        ext.embedding_rms_norm(torch.tensor([3, token]), torch.randn(50, 8), torch.ones(8), 1e-6)


# ---------------------------------------------------------------------------------------------------------
# qk_norm_rope_store


def qkv_views(gen, rows, q_heads, kv_heads, head_dim, dtype):
    """q, k, v as views into one fused projection output, as the model produces them."""
    q_width, kv_width = q_heads * head_dim, kv_heads * head_dim
    fused = randn(gen, rows, q_width + 2 * kv_width, dtype=dtype)
    q = fused[:, :q_width].view(rows, q_heads, head_dim)
    k = fused[:, q_width : q_width + kv_width].view(rows, kv_heads, head_dim)
    v = fused[:, q_width + kv_width :].view(rows, kv_heads, head_dim)
    return q, k, v


def qk_norm_rope_setup(gen, dtype, rows):
    kv_heads = randint(gen, 1, 3)
    q_heads = kv_heads * randint(gen, 1, 3)
    head_dim = 2 * randint(gen, 1, 40)
    q, k, v = qkv_views(gen, rows, q_heads, kv_heads, head_dim, dtype)
    q_weight = (1 + 0.3 * randn(gen, head_dim)).to(dtype)
    k_weight = (1 + 0.3 * randn(gen, head_dim)).to(dtype)
    position = randint(gen, 0, 500)
    table = rope_table(position + rows + randint(gen, 0, 5), head_dim)
    dst_rows = rows + randint(gen, 0, 40)
    dst_start = randint(gen, 0, dst_rows - rows)
    return q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start


def run_qk_norm_rope_store(q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start, eps=1e-6):
    k_dst = torch.full((dst_rows,) + k.shape[1:], float("nan"), dtype=k.dtype)
    v_dst = torch.full_like(k_dst, float("nan"))
    q_out = ext.qk_norm_rope_store(q, k, v, q_weight, k_weight, table, scalar(position), k_dst, v_dst,
                                   scalar(dst_start), eps)
    return q_out, k_dst, v_dst


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference_and_is_row_invariant(gen, dtype):
    rows, features = randint(gen, 2, 64), randint(gen, 1, 300)
    gate_up = rows_view(gen, rows, 2 * features, dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    actual = ext.silu_mul(gate_up)
    assert_close(actual, expected, dtype, (gate.abs() * up.abs()).clamp_min(1e-3))
    singles = torch.cat([ext.silu_mul(gate_up[m:m + 1]) for m in range(rows)])
    assert torch.equal(actual.view(torch.int8), singles.view(torch.int8))


def test_silu_mul_rejects_an_odd_width():
    with pytest.raises(ValueError, match="even"):
        ext.silu_mul(torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_store_matches_reference(gen, dtype):
    rows = randint(gen, 1, 64)
    q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start = qk_norm_rope_setup(gen, dtype, rows)
    eps = 1e-6
    q_out, k_dst, v_dst = run_qk_norm_rope_store(q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start)
    cos_sin = table[position : position + rows]
    expected_q = reference_rope(reference_rms_norm(q, q_weight, eps), cos_sin)
    expected_k = reference_rope(reference_rms_norm(k, k_weight, eps), cos_sin)
    # A rotation keeps each pair's length: that is the size of the terms.
    assert_close(q_out, expected_q, dtype, reference_rms_norm(q, q_weight, eps).abs().amax(-1, keepdim=True) + 1e-3)
    stored = slice(dst_start, dst_start + rows)
    assert_close(k_dst[stored], expected_k, dtype,
                 reference_rms_norm(k, k_weight, eps).abs().amax(-1, keepdim=True) + 1e-3)
    assert torch.equal(v_dst[stored], v), "v must be stored unchanged"
    outside = torch.ones(dst_rows, dtype=torch.bool)
    outside[stored] = False
    assert k_dst[outside].isnan().all() and v_dst[outside].isnan().all(), "wrote outside [dst_start, +rows)"
    if dtype != torch.float32:
        wide = run_qk_norm_rope_store(q.float(), k.float(), v.float(), q_weight.float(), k_weight.float(), table,
                                      position, dst_rows, dst_start)
        assert torch.equal(q_out, wide[0].to(dtype)) and torch.equal(k_dst[stored], wide[1][stored].to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_store_row_invariant(gen, dtype):
    rows = randint(gen, 2, 64)
    q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start = qk_norm_rope_setup(gen, dtype, rows)
    q_out, k_dst, v_dst = run_qk_norm_rope_store(q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start)
    for m in range(rows):
        one = run_qk_norm_rope_store(q[m : m + 1], k[m : m + 1], v[m : m + 1], q_weight, k_weight, table,
                                     position + m, dst_rows, dst_start + m)
        assert torch.equal(one[0], q_out[m : m + 1]), f"q row {m}"
        assert torch.equal(one[1][dst_start + m], k_dst[dst_start + m]), f"k row {m}"
        assert torch.equal(one[2][dst_start + m], v_dst[dst_start + m]), f"v row {m}"


# ---------------------------------------------------------------------------------------------------------
# the fused forms: bit for bit the separate calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_silu_mul_is_linear_then_silu_mul(gen, dtype):
    rows, features, in_features = randint(gen, 1, 64), randint(gen, 1, 100), randint(gen, 1, 200)
    x = rows_view(gen, rows, in_features, dtype)
    weight = randn(gen, 2 * features, in_features, dtype=dtype)
    assert torch.equal(ext.linear_silu_mul(x, weight), ext.silu_mul(ext.linear(x, weight)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_qk_norm_rope_store_is_linear_then_qk_norm_rope_store(gen, dtype):
    rows, in_features = randint(gen, 1, 64), randint(gen, 1, 200)
    q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start = qk_norm_rope_setup(gen, dtype, rows)
    q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    x = rows_view(gen, rows, in_features, dtype)
    weight = randn(gen, (q_heads + 2 * kv_heads) * head_dim, in_features, dtype=dtype)
    qkv = ext.linear(x, weight)
    q, k, v = (part.view(rows, -1, head_dim) for part in qkv.split([q_heads * head_dim, kv_heads * head_dim,
                                                                    kv_heads * head_dim], dim=-1))
    expected = run_qk_norm_rope_store(q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start)
    k_dst = torch.full_like(expected[1], float("nan"))
    v_dst = torch.full_like(expected[2], float("nan"))
    q_out = ext.linear_qk_norm_rope_store(x, weight, q_weight, k_weight, table, scalar(position), k_dst, v_dst,
                                          scalar(dst_start), 1e-6)
    for actual, wanted in zip((q_out, k_dst, v_dst), expected):  # bits, so that the NaN rows compare too
        assert torch.equal(actual.view(torch.int8), wanted.view(torch.int8))


# ---------------------------------------------------------------------------------------------------------
# the deferred norm: linear_add_deferred_norm, and the projections that finish it from its square_sums


def deferred_norm_setup(gen, dtype, rows, dim):
    in_features = randint(gen, 1, 200)
    x = rows_view(gen, rows, in_features, dtype)
    weight = randn(gen, dim, in_features, dtype=dtype)
    residual = randn(gen, rows, dim, dtype=dtype)
    norm_weight = (1 + 0.3 * randn(gen, dim)).to(dtype)
    return x, weight, residual, norm_weight


def column_run_square_sums(residual):
    """float64 sums of squares over each run of 64 columns (the last run may be shorter)."""
    rows, dim = residual.shape
    padded = torch.nn.functional.pad(residual.double() ** 2, (0, -dim % 64))
    return padded.view(rows, -1, 64).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_add_deferred_norm_updates_the_residual_as_add_rms_norm(gen, dtype):
    rows, dim = randint(gen, 1, 64), randint(gen, 1, 300)
    x, weight, residual, norm_weight = deferred_norm_setup(gen, dtype, rows, dim)
    expected_residual = residual.clone()
    ext.add_rms_norm(expected_residual, ext.linear(x, weight), norm_weight, 1e-6)
    weighted, square_sums = ext.linear_add_deferred_norm(x, weight, residual, norm_weight)
    assert torch.equal(residual, expected_residual)
    assert torch.equal(weighted, (residual.float() * norm_weight.float()).to(dtype))
    # Sums of squares of one sign: fp32 loses at most 64 roundings of 2^-24 each.
    torch.testing.assert_close(square_sums.double(), column_run_square_sums(residual), rtol=1e-5, atol=0)


def test_linear_add_deferred_norm_refuses_a_residual_over_x():
    """The residual is written while x may still be read, so they must not overlap, strided x included."""
    memory = torch.randn(400)
    x = memory[:40].view(4, 10)[:, :8]  # spans elements 0..37
    weight, norm_weight = torch.randn(70, 8), torch.randn(70)
    with pytest.raises(ValueError, match="^residual must not share memory with x"):
        ext.linear_add_deferred_norm(x, weight, memory[30:310].view(4, 70), norm_weight)
    ext.linear_add_deferred_norm(x, weight, memory[38:318].view(4, 70), norm_weight)


def deferred_swiglu_reference(weighted, residual, gate_up, eps, dtype):
    """(exact, bound): the float64 SwiGLU of [gate | up] over a deferred norm (weighted = residual * norm weight,
    scaled by the residual's RMS), and the most a kernel of dtype may miss it by. Rounding gate and up, then
    the product: silu's slope stays below 1.1, so 4 roundings bound it."""
    scale = torch.rsqrt((residual.double() ** 2).mean(-1, keepdim=True) + eps)
    inputs = weighted.double()
    gate, up = (inputs @ gate_up.double().T * scale).chunk(2, dim=-1)
    gate_size, up_size = (inputs.abs() @ gate_up.double().abs().T * scale).chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up, 4 * RTOL[dtype] * gate_size * up_size + 1e-30


@pytest.mark.parametrize("dtype", DTYPES)
def test_projections_of_a_deferred_norm_apply_its_row_scale(gen, dtype):
    rows, dim, eps = randint(gen, 1, 64), randint(gen, 1, 300), 1e-6
    x, weight, residual, norm_weight = deferred_norm_setup(gen, dtype, rows, dim)
    weighted, square_sums = ext.linear_add_deferred_norm(x, weight, residual, norm_weight)
    scale = torch.rsqrt((residual.double() ** 2).mean(-1, keepdim=True) + eps)
    inputs = weighted.double()

    features = randint(gen, 1, 100)
    gate_up = randn(gen, 2 * features, dim, dtype=dtype)
    exact, bound = deferred_swiglu_reference(weighted, residual, gate_up, eps, dtype)
    out = ext.linear_silu_mul(weighted, gate_up, square_sums, eps)
    assert ((out.double() - exact).abs() <= bound).all()

    # v is stored as projected: the row scale must be on it (q and k are normalised per head again).
    q, k, v, q_weight, k_weight, table, position, dst_rows, dst_start = qk_norm_rope_setup(gen, dtype, rows)
    q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    qkv_weight = randn(gen, (q_heads + 2 * kv_heads) * head_dim, dim, dtype=dtype)
    k_dst = torch.full((dst_rows, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_dst = torch.full_like(k_dst, float("nan"))
    ext.linear_qk_norm_rope_store(weighted, qkv_weight, q_weight, k_weight, table, scalar(position), k_dst, v_dst,
                                  scalar(dst_start), eps, square_sums, eps)
    v_weight = qkv_weight[-kv_heads * head_dim:].double()
    stored = v_dst[dst_start:dst_start + rows].reshape(rows, -1).double()
    bound = RTOL[dtype] * (inputs.abs() @ v_weight.abs().T * scale) + 1e-30
    assert ((stored - inputs @ v_weight.T * scale).abs() <= bound).all()


def test_long_blocks_apply_a_deferred_norm_as_the_kernels_do(gen):
    """Past MAX_BLOCK_ROWS, orthrus.ops computes with PyTorch; given a deferred norm it must scale alike."""
    from orthrus import ops

    rows, dim, eps = ops.MAX_BLOCK_ROWS + 6, randint(gen, 8, 200), 1e-6
    x, weight, residual, norm_weight = deferred_norm_setup(gen, torch.float32, rows, dim)
    pieces = [ext.linear_add_deferred_norm(x[:64], weight, residual[:64], norm_weight),
              ext.linear_add_deferred_norm(x[64:], weight, residual[64:], norm_weight)]
    weighted, square_sums = (torch.cat(parts) for parts in zip(*pieces))
    gate_up = randn(gen, 2 * randint(gen, 1, 50), dim)
    # Both within the bound of the exact result: a fixed tolerance between the two failed on draws whose sums
    # cancel.
    exact, bound = deferred_swiglu_reference(weighted, residual, gate_up, eps, torch.float32)
    long_block = ops.linear_silu_mul(weighted, gate_up, square_sums, eps)
    kernel = ext.linear_silu_mul(weighted[:64], gate_up, square_sums[:64], eps)
    assert ((long_block.double() - exact).abs() <= bound).all()
    assert ((kernel.double() - exact[:64]).abs() <= bound[:64]).all()


# ---------------------------------------------------------------------------------------------------------
# linear_argmax: torch.argmax of the stored linear, ties, NaN and signed zeros included


def first_maximum(logits):
    """Index of the first maximum per row, found without torch.argmax (no NaN in `logits`)."""
    columns = torch.arange(logits.shape[-1]).expand_as(logits)
    is_maximum = logits == logits.max(-1, keepdim=True).values
    return columns.masked_fill(~is_maximum, logits.shape[-1]).min(-1).values


def tie_case(gen, rows, out_features, dtype):
    """x [rows, in_features] and weight [out_features >= 16, in_features] of small integers, so that every
    logit is exact in any summation order and dtype, where each row's maximum is shared by several columns
    at random places."""
    in_features, distinct = 8 * randint(gen, 1, 8), randint(gen, 1, 8)
    x = torch.randint(0, 3, (rows, in_features), generator=gen).to(dtype)
    # Every column holds the all -2 row (the least logit x >= 0 allows) but 2 * distinct random ones, which
    # hold each of `distinct` random rows twice.
    candidates = torch.cat([torch.full((1, in_features), -2),
                            torch.randint(-2, 3, (distinct, in_features), generator=gen)])
    choice = torch.zeros(out_features, dtype=torch.long)
    choice[torch.randperm(out_features, generator=gen)[: 2 * distinct]] = torch.arange(1, distinct + 1).repeat(2)
    return x, candidates[choice].to(dtype)


@pytest.mark.parametrize("out_features", [1, 63, 64, 65, 200, None], ids=lambda n: f"n{n or 'random'}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_argmax_is_linear_then_argmax(gen, dtype, out_features):
    in_features, out_features = randint(gen, 1, 300), out_features or randint(gen, 1, 300)
    x = rows_view(gen, 64, in_features, dtype)
    weight = randn(gen, out_features, in_features, dtype=dtype)
    tokens = ext.linear_argmax(x, weight)
    assert tokens.dtype == torch.int64 and tokens.shape == (64,)
    assert torch.equal(tokens, ext.linear(x, weight).argmax(-1))
    for rows in range(1, 64):
        assert torch.equal(ext.linear_argmax(x[:rows], weight), tokens[:rows]), f"rows={rows}"
    for m in range(64):
        assert torch.equal(ext.linear_argmax(x[m : m + 1], weight), tokens[m : m + 1]), f"row {m} alone"


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_argmax_ties_go_to_the_smallest_column(gen, dtype):
    x, weight = tie_case(gen, randint(gen, 1, 64), randint(gen, 16, 300), dtype)
    logits = ext.linear(x, weight)
    assert bool(((logits == logits.max(-1, keepdim=True).values).sum(-1) >= 2).all())
    tokens = ext.linear_argmax(x, weight)
    assert torch.equal(tokens, first_maximum(logits))
    assert torch.equal(tokens, logits.argmax(-1))


def special_values_case(gen, dtype, out_features):
    """x [4, in_features] and weight [out_features >= 2, in_features] whose logits hold, by row: +-inf and,
    from a random column on, NaN (the first NaN wins, over an earlier +inf too); -inf and, from a random
    column on, +inf (the first +inf wins); NaN only (column 0); negatives and, from a random column on,
    -0.0 then +0.0 (the first zero wins). Returns x, weight and the columns torch.argmax picks."""
    in_features = 8 * randint(gen, 1, 8)
    tiny = 2.0**-14 if dtype == torch.float16 else 2.0**-70  # tiny * tiny rounds to zero in float16 / bfloat16
    x = randn(gen, 4, in_features, dtype=dtype)
    weight = randn(gen, out_features, in_features, dtype=dtype)
    first = [randint(gen, 0, out_features - 1), randint(gen, 0, out_features - 1), randint(gen, 0, out_features - 2)]

    def from_first(row, value):
        later = torch.randint(first[row], out_features, (randint(gen, 0, 4),), generator=gen)
        weight[torch.cat([later, torch.tensor([first[row]])]), row] = value

    # Against x = inf in column 0: +1 gives +inf, -1 gives -inf, 0 gives NaN (0 * inf).
    weight[:, 0] = torch.randint(0, 2, (out_features,), generator=gen) * 2.0 - 1
    from_first(0, 0.0)
    x[0, 0] = float("inf")
    weight[:, 1] = -1.0
    from_first(1, 1.0)
    x[1, 1] = float("inf")
    x[2, 2] = float("nan")
    # Against x = tiny alone: -1 gives -tiny, -tiny gives -0.0 and +tiny +0.0 once rounded to dtype.
    weight[:, 3] = -1.0
    weight[randint(gen, first[2] + 1, out_features - 1), 3] = tiny
    weight[first[2], 3] = -tiny
    x[3] = 0
    x[3, 3] = tiny
    return x, weight, torch.tensor([first[0], first[1], 0, first[2]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_argmax_nan_infinities_and_signed_zeros(gen, dtype):
    x, weight, expected = special_values_case(gen, dtype, randint(gen, 2, 300))
    logits = ext.linear(x, weight)
    assert logits[0].isnan().any() and logits[2].isnan().all()
    zero_from = logits[3, expected[3]:]
    assert zero_from[0] == 0 and zero_from[0].signbit() and ((zero_from == 0) & ~zero_from.signbit()).any()
    tokens = ext.linear_argmax(x, weight)
    assert torch.equal(tokens, expected)
    assert torch.equal(tokens, logits.argmax(-1))
    for m in range(4):
        assert torch.equal(ext.linear_argmax(x[m : m + 1], weight), expected[m : m + 1]), f"row {m} alone"


# ---------------------------------------------------------------------------------------------------------
# attention


def attention_setup(gen, dtype, rows, head_dim=None):
    kv_heads = randint(gen, 1, 3)
    q_heads = kv_heads * randint(gen, 1, 4)
    head_dim = head_dim or random.Random(randint(gen, 0, 1000)).choice([8, 16, 20, 32, 64, 128])
    cache_len = randint(gen, 0, 120)
    cache_rows = cache_len + rows + randint(gen, 0, 30)
    q = randn(gen, rows, q_heads, head_dim, dtype=dtype)
    k_cache = torch.full((cache_rows, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[: cache_len + rows] = randn(gen, cache_len + rows, kv_heads, head_dim, dtype=dtype)
    v_cache[: cache_len + rows] = randn(gen, cache_len + rows, kv_heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, cache_len, 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_attention_matches_reference(gen, dtype):
    rows = randint(gen, 1, 64)
    q, k_cache, v_cache, cache_len, scale = attention_setup(gen, dtype, rows)
    out = ext.attention(q, k_cache, v_cache, scalar(cache_len), None, None, True, scale)
    assert out.shape == q.shape and out.dtype == dtype
    visible = [cache_len + m + 1 for m in range(rows)]
    expected, magnitude = reference_attention(q, k_cache, v_cache, visible, scale)
    assert_close(out, expected, dtype, magnitude + 1e-3)
    if dtype != torch.float32:
        wide = ext.attention(q.float(), k_cache.float(), v_cache.float(), scalar(cache_len), None, None, True, scale)
        assert torch.equal(out, wide.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bidirectional_attention_matches_reference(gen, dtype):
    rows = randint(gen, 1, 64)
    q, k_cache, v_cache, cache_len, scale = attention_setup(gen, dtype, rows)
    k_cache[cache_len:] = float("nan")  # the block's keys come from k_block / v_block only
    v_cache[cache_len:] = float("nan")
    k_block = randn(gen, rows, *k_cache.shape[1:], dtype=dtype)
    v_block = randn(gen, rows, *k_cache.shape[1:], dtype=dtype)
    out = ext.attention(q, k_cache, v_cache, scalar(cache_len), k_block, v_block, False, scale)
    keys = torch.cat([k_cache[:cache_len], k_block])
    values = torch.cat([v_cache[:cache_len], v_block])
    expected, magnitude = reference_attention(q, keys, values, [cache_len + rows] * rows, scale)
    assert_close(out, expected, dtype, magnitude + 1e-3)
    # Same keys in the same order -> same bits: each bidirectional row equals a one-row causal call that
    # sees the block through the cache.
    k_cache[cache_len : cache_len + rows] = k_block
    v_cache[cache_len : cache_len + rows] = v_block
    for m in range(rows):
        one = ext.attention(q[m : m + 1], k_cache, v_cache, scalar(cache_len + rows - 1), None, None, True, scale)
        assert torch.equal(one, out[m : m + 1]), f"row {m}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_attention_row_invariant(gen, dtype):
    q, k_cache, v_cache, cache_len, scale = attention_setup(gen, dtype, 64, head_dim=[16, 20, 64][randint(gen, 0, 2)])
    full = ext.attention(q, k_cache, v_cache, scalar(cache_len), None, None, True, scale)
    for rows in range(1, 65):
        block = ext.attention(q[:rows], k_cache, v_cache, scalar(cache_len), None, None, True, scale)
        assert torch.equal(block, full[:rows]), f"rows={rows}"
    for m in range(64):
        one = ext.attention(q[m : m + 1], k_cache, v_cache, scalar(cache_len + m), None, None, True, scale)
        assert torch.equal(one, full[m : m + 1]), f"row {m} as a one-token step at cache_len + {m}"


# ---------------------------------------------------------------------------------------------------------
# accept


@pytest.mark.parametrize("case", ["mismatch", "all_accepted", "single_row"])
def test_accept(gen, case):
    rows = 1 if case == "single_row" else randint(gen, 2, 64)
    targets = torch.randint(0, 1000, (rows,), generator=gen)
    drafts = targets[:-1].clone()
    accepted = rows - 1
    if case == "mismatch":
        accepted = randint(gen, 0, rows - 2)
        drafts[accepted] += 1 + randint(gen, 0, 5)
        drafts[accepted + 1 :] = torch.randint(0, 1000, (rows - 2 - accepted,), generator=gen)
    start = randint(gen, 0, 1000)
    cache_len, next_anchor = scalar(start), scalar(-7, torch.int64)
    emitted = torch.full((rows + 1,), -7, dtype=torch.int64)
    ext.accept(drafts, targets, cache_len, emitted, next_anchor)
    assert emitted[0].item() == accepted + 1
    assert torch.equal(emitted[1:], targets)
    assert next_anchor.item() == targets[accepted].item()
    assert cache_len.item() == start + accepted + 1


def test_accept_writes_the_next_anchor_in_place_of_the_anchor(gen):
    """The runner passes the anchor it verified as next_anchor: it is replaced only after being read."""
    block = torch.tensor([5, 6, 7, 8])
    anchor, drafts = block[:1], block[1:]
    targets = torch.tensor([6, 7, 9, 3])
    cache_len, emitted = scalar(10), torch.zeros(5, dtype=torch.int64)
    ext.accept(drafts, targets, cache_len, emitted, anchor)
    assert emitted.tolist() == [3, 6, 7, 9, 3] and block.tolist() == [9, 6, 7, 8] and cache_len.item() == 13


# ---------------------------------------------------------------------------------------------------------
# bad arguments: each raises ValueError / TypeError naming the argument


def good_arguments():
    f32 = torch.float32
    rows, q_heads, kv_heads, head_dim = 4, 4, 2, 16
    return {
        "linear": dict(x=torch.randn(rows, 8), weight=torch.randn(5, 8)),
        "linear_argmax": dict(x=torch.randn(rows, 8), weight=torch.randn(5, 8)),
        "linear_silu_mul": dict(x=torch.randn(rows, 8), weight=torch.randn(6, 8),
                                square_sums=torch.rand(rows, 1), norm_eps=1e-6),
        "linear_add_deferred_norm": dict(x=torch.randn(rows, 8), weight=torch.randn(70, 8),
                                         residual=torch.randn(rows, 70), norm_weight=torch.randn(70)),
        "linear_qk_norm_rope_store": dict(
            x=torch.randn(rows, 8), weight=torch.randn((q_heads + 2 * kv_heads) * head_dim, 8),
            q_norm_weight=torch.ones(head_dim), k_norm_weight=torch.ones(head_dim),
            rope_cos_sin=rope_table(32, head_dim), positions_start=scalar(3),
            k_dst=torch.zeros(16, kv_heads, head_dim), v_dst=torch.zeros(16, kv_heads, head_dim),
            dst_start=scalar(3), eps=1e-6, square_sums=torch.rand(rows, 1), norm_eps=1e-6),
        "rms_norm": dict(x=torch.randn(rows, 8), weight=torch.randn(8), eps=1e-6),
        "add_rms_norm": dict(x=torch.randn(rows, 8), delta=torch.randn(rows, 8), weight=torch.randn(8), eps=1e-6),
        "embedding_rms_norm": dict(tokens=torch.arange(rows), table=torch.randn(16, 8), weight=torch.randn(8),
                                   eps=1e-6),
        "qk_norm_rope_store": dict(
            q=torch.randn(rows, q_heads, head_dim), k=torch.randn(rows, kv_heads, head_dim),
            v=torch.randn(rows, kv_heads, head_dim), q_norm_weight=torch.ones(head_dim),
            k_norm_weight=torch.ones(head_dim), rope_cos_sin=rope_table(32, head_dim), positions_start=scalar(3),
            k_dst=torch.zeros(16, kv_heads, head_dim, dtype=f32), v_dst=torch.zeros(16, kv_heads, head_dim),
            dst_start=scalar(3), eps=1e-6),
        "attention": dict(
            q=torch.randn(rows, q_heads, head_dim), k_cache=torch.randn(16, kv_heads, head_dim),
            v_cache=torch.randn(16, kv_heads, head_dim), cache_len=scalar(5), k_block=None, v_block=None,
            causal=True, scale=0.25),
        "accept": dict(drafts=torch.arange(3), targets=torch.arange(4), cache_len=scalar(0),
                       emitted=torch.zeros(5, dtype=torch.int64), next_anchor=scalar(0, torch.int64)),
    }


BAD_ARGUMENTS = [
    # (op, argument, replacement, exception)
    ("linear", "x", lambda a: a["x"].to(torch.float64), TypeError),
    ("linear", "x", lambda a: a["x"].to(torch.int32), TypeError),
    ("linear", "x", lambda a: a["x"][None], ValueError),
    ("linear", "x", lambda a: a["x"][:0], ValueError),
    ("linear", "x", lambda a: torch.randn(8, 4).T, ValueError),
    ("linear", "x", lambda a: a["x"].to("meta"), ValueError),
    ("linear", "weight", lambda a: a["weight"].half(), TypeError),
    ("linear", "weight", lambda a: torch.randn(5, 9), ValueError),
    ("linear", "weight", lambda a: torch.randn(8, 5).T, ValueError),
    ("linear", "weight", lambda a: a["weight"].to("meta"), ValueError),
    ("linear_argmax", "x", lambda a: a["x"].to(torch.float64), TypeError),
    ("linear_argmax", "x", lambda a: a["x"][None], ValueError),
    ("linear_argmax", "weight", lambda a: a["weight"].bfloat16(), TypeError),
    ("linear_argmax", "weight", lambda a: torch.randn(5, 9), ValueError),
    ("linear_argmax", "weight", lambda a: torch.randn(0, 8), ValueError),
    ("linear_silu_mul", "x", lambda a: a["x"].to(torch.float64), TypeError),
    ("linear_silu_mul", "weight", lambda a: torch.randn(5, 8), ValueError),
    ("linear_silu_mul", "weight", lambda a: torch.randn(6, 9), ValueError),
    ("linear_silu_mul", "square_sums", lambda a: torch.rand(4, 2), ValueError),
    ("linear_silu_mul", "square_sums", lambda a: torch.rand(3, 1), ValueError),
    ("linear_silu_mul", "square_sums", lambda a: torch.rand(4, 1).double(), TypeError),
    ("linear_silu_mul", "square_sums", lambda a: torch.rand(4, 2)[:, :1], ValueError),
    ("linear_silu_mul", "norm_eps", lambda a: -1.0, ValueError),
    ("linear_add_deferred_norm", "x", lambda a: a["x"].double(), TypeError),
    ("linear_add_deferred_norm", "weight", lambda a: torch.randn(70, 9), ValueError),
    ("linear_add_deferred_norm", "residual", lambda a: torch.randn(4, 69), ValueError),
    ("linear_add_deferred_norm", "residual", lambda a: torch.randn(3, 70), ValueError),
    ("linear_add_deferred_norm", "residual", lambda a: a["residual"].bfloat16(), TypeError),
    ("linear_add_deferred_norm", "residual", lambda a: torch.randn(70, 4).T, ValueError),
    ("linear_add_deferred_norm", "norm_weight", lambda a: torch.randn(8), ValueError),
    ("linear_add_deferred_norm", "norm_weight", lambda a: a["norm_weight"].half(), TypeError),
    ("linear_qk_norm_rope_store", "x", lambda a: torch.randn(8, 4).T, ValueError),
    ("linear_qk_norm_rope_store", "weight", lambda a: torch.randn(64, 8), ValueError),
    ("linear_qk_norm_rope_store", "weight", lambda a: torch.randn(136, 8), ValueError),
    ("linear_qk_norm_rope_store", "q_norm_weight", lambda a: torch.ones(8), ValueError),
    ("linear_qk_norm_rope_store", "k_norm_weight", lambda a: torch.ones(16).half(), TypeError),
    ("linear_qk_norm_rope_store", "rope_cos_sin", lambda a: rope_table(32, 8), ValueError),
    ("linear_qk_norm_rope_store", "positions_start", lambda a: scalar(30), ValueError),
    ("linear_qk_norm_rope_store", "k_dst", lambda a: torch.zeros(16, 2, 15), ValueError),
    ("linear_qk_norm_rope_store", "v_dst", lambda a: torch.zeros(15, 2, 16), ValueError),
    ("linear_qk_norm_rope_store", "dst_start", lambda a: scalar(14), ValueError),
    ("linear_qk_norm_rope_store", "eps", lambda a: float("nan"), ValueError),
    ("linear_qk_norm_rope_store", "square_sums", lambda a: torch.rand(4, 2), ValueError),
    ("linear_qk_norm_rope_store", "norm_eps", lambda a: float("inf"), ValueError),
    ("rms_norm", "x", lambda a: a["x"].to(torch.int64), TypeError),
    ("rms_norm", "weight", lambda a: torch.randn(9), ValueError),
    ("rms_norm", "weight", lambda a: a["weight"].bfloat16(), TypeError),
    ("rms_norm", "eps", lambda a: float("nan"), ValueError),
    ("rms_norm", "eps", lambda a: -1.0, ValueError),
    ("add_rms_norm", "x", lambda a: torch.randn(8, 4).T, ValueError),
    ("add_rms_norm", "delta", lambda a: a["delta"][:3], ValueError),
    ("add_rms_norm", "delta", lambda a: a["delta"].bfloat16(), TypeError),
    ("add_rms_norm", "delta", lambda a: a["x"], ValueError),
    ("add_rms_norm", "weight", lambda a: torch.randn(9), ValueError),
    ("add_rms_norm", "eps", lambda a: -1.0, ValueError),
    ("qk_norm_rope_store", "q", lambda a: a["q"].to(torch.float64), TypeError),
    ("qk_norm_rope_store", "q", lambda a: torch.randn(4, 4, 15), ValueError),
    ("qk_norm_rope_store", "q", lambda a: torch.randn(4, 16, 4).transpose(1, 2), ValueError),
    ("qk_norm_rope_store", "k", lambda a: a["k"][:3], ValueError),
    ("qk_norm_rope_store", "k", lambda a: a["k"].half(), TypeError),
    ("qk_norm_rope_store", "v", lambda a: a["v"][:, :1], ValueError),
    ("qk_norm_rope_store", "q_norm_weight", lambda a: torch.ones(8), ValueError),
    ("qk_norm_rope_store", "k_norm_weight", lambda a: torch.ones(16, dtype=torch.bfloat16), TypeError),
    ("qk_norm_rope_store", "rope_cos_sin", lambda a: a["rope_cos_sin"].double(), TypeError),
    ("qk_norm_rope_store", "rope_cos_sin", lambda a: rope_table(32, 8), ValueError),
    ("qk_norm_rope_store", "positions_start", lambda a: scalar(29), ValueError),
    ("qk_norm_rope_store", "positions_start", lambda a: scalar(-1), ValueError),
    ("qk_norm_rope_store", "positions_start", lambda a: scalar(3, torch.int64), TypeError),
    ("qk_norm_rope_store", "positions_start", lambda a: torch.zeros(2, dtype=torch.int32), ValueError),
    ("qk_norm_rope_store", "k_dst", lambda a: torch.zeros(16, 1, 16), ValueError),
    ("qk_norm_rope_store", "k_dst", lambda a: torch.zeros(2, 16, 16).transpose(0, 1), ValueError),
    ("qk_norm_rope_store", "v_dst", lambda a: torch.zeros(15, 2, 16), ValueError),
    ("qk_norm_rope_store", "dst_start", lambda a: scalar(13), ValueError),
    ("qk_norm_rope_store", "dst_start", lambda a: scalar(0).to("meta"), ValueError),
    ("attention", "q", lambda a: a["q"].transpose(0, 1), ValueError),
    ("attention", "q", lambda a: a["q"].to(torch.int16), TypeError),
    ("attention", "k_cache", lambda a: torch.randn(16, 3, 16), ValueError),
    ("attention", "k_cache", lambda a: a["k_cache"].half(), TypeError),
    ("attention", "v_cache", lambda a: torch.randn(15, 2, 16), ValueError),
    ("attention", "v_cache", lambda a: torch.randn(16, 2, 16).transpose(0, 1).contiguous().transpose(0, 1),
     ValueError),
    ("attention", "cache_len", lambda a: scalar(13), ValueError),
    ("attention", "cache_len", lambda a: scalar(-1), ValueError),
    ("attention", "cache_len", lambda a: scalar(5, torch.int64), TypeError),
    ("attention", "k_block", lambda a: torch.randn(4, 2, 16), ValueError),
    ("attention", "scale", lambda a: float("inf"), ValueError),
    ("embedding_rms_norm", "tokens", lambda a: a["tokens"].to(torch.int32), TypeError),
    ("embedding_rms_norm", "tokens", lambda a: torch.arange(65), ValueError),
    ("embedding_rms_norm", "table", lambda a: a["table"].to(torch.int32), TypeError),
    ("embedding_rms_norm", "weight", lambda a: torch.randn(9), ValueError),
    ("embedding_rms_norm", "eps", lambda a: -1.0, ValueError),
    ("accept", "drafts", lambda a: torch.arange(4), ValueError),
    ("accept", "targets", lambda a: torch.arange(4, dtype=torch.int32), TypeError),
    ("accept", "targets", lambda a: torch.arange(0), ValueError),
    ("accept", "cache_len", lambda a: scalar(0, torch.int64), TypeError),
    ("accept", "emitted", lambda a: torch.zeros(4, dtype=torch.int64), ValueError),
    ("accept", "emitted", lambda a: torch.zeros(5, dtype=torch.int32), TypeError),
    ("accept", "emitted", lambda a: torch.zeros(10, dtype=torch.int64)[::2], ValueError),
    ("accept", "emitted", lambda a: a["targets"].new_zeros(0).set_(a["drafts"].untyped_storage(), 0, (5,)),
     ValueError),
    ("accept", "next_anchor", lambda a: scalar(0), TypeError),
]


@pytest.mark.parametrize("op,argument,replace,error", BAD_ARGUMENTS,
                         ids=[f"{op}-{argument}-{i}" for i, (op, argument, _, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_argument_is_reported(op, argument, replace, error):
    arguments = good_arguments()[op]
    getattr(ext, op)(**arguments)  # the unmodified call is valid
    arguments[argument] = replace(arguments)
    with pytest.raises(error, match=rf"^{re.escape(argument)}\b"):
        getattr(ext, op)(**arguments)


@pytest.mark.parametrize("k_block,v_block", [(None, None), ("block", None), (None, "block")])
def test_bidirectional_attention_requires_the_block(k_block, v_block):
    arguments = good_arguments()["attention"]
    block = torch.randn(4, 2, 16)
    arguments.update(causal=False, k_block=block if k_block else None, v_block=block if v_block else None)
    with pytest.raises(ValueError, match="k_block and v_block are required"):
        ext.attention(**arguments)



def test_extension_imports_on_its_own():
    """`import orthrus_ext` must not need `import torch` first (the package loads libtorch for it)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import orthrus_ext; print(orthrus_ext.has_cuda())"],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
