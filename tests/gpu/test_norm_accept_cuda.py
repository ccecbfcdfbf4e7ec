"""The CUDA RMSNorm, fused q/k-norm + RoPE + cache store, and acceptance kernels."""

import random

import pytest
import torch

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = 1e-6


def relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def reference_rms_norm(x, weight):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()


@pytest.mark.parametrize("dim", [1024, 2560, 4096, 5120, 1000, 24])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(ext, dtype, dim):
    rows = random.randint(1, 64)
    # A strided view (row stride > dim), as the kernel gets from a fused projection.
    wide = torch.randn(rows, dim + 24, device="cuda").mul_(random.choice([0.1, 3.0])).to(dtype)
    x = wide[:, :dim]
    weight = torch.randn(dim, device="cuda").to(dtype)
    torch.empty(rows * dim // 2 + 1, device="cuda").fill_(float("nan"))  # poison the next allocation
    y = ext.rms_norm(x, weight, EPS)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    assert relative_error(y, reference_rms_norm(x, weight)) < TOLERANCE[dtype]
    for m in random.sample(range(rows), min(rows, 8)):
        assert torch.equal(ext.rms_norm(x[m:m + 1], weight, EPS)[0], y[m]), f"row {m} of {rows}"
    assert torch.equal(ext.rms_norm(x.contiguous(), weight, EPS), y)


@pytest.mark.parametrize("dim", [1024, 2560, 4096, 5120, 1000, 24])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm(ext, dtype, dim):
    rows = random.randint(1, 64)
    x = torch.randn(rows, dim, device="cuda").mul_(random.choice([0.1, 3.0])).to(dtype)
    delta = torch.randn(rows, dim, device="cuda").to(dtype)
    weight = torch.randn(dim, device="cuda").to(dtype)
    residual = x.clone()
    torch.empty(rows * dim // 2 + 1, device="cuda").fill_(float("nan"))  # poison the next allocation
    y = ext.add_rms_norm(residual, delta, weight, EPS)
    torch.cuda.synchronize()
    # The residual update is an elementwise add rounded once; the norm sees the rounded sum.
    assert torch.equal(residual, x + delta)
    assert torch.isfinite(y).all()
    assert relative_error(y, reference_rms_norm(residual, weight)) < TOLERANCE[dtype]
    assert torch.equal(y, ext.rms_norm(residual, weight, EPS))
    for m in random.sample(range(rows), min(rows, 8)):
        one = x[m:m + 1].clone()
        assert torch.equal(ext.add_rms_norm(one, delta[m:m + 1], weight, EPS)[0], y[m]), f"row {m} of {rows}"


@pytest.mark.parametrize("dim", [1024, 2560, 4096, 1000, 24])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_rms_norm(ext, dtype, dim):
    rows, vocab = random.randint(1, 64), random.choice([151936, 1000, 3])
    table = torch.randn(vocab, dim, device="cuda").mul_(random.choice([0.1, 3.0])).to(dtype)
    weight = torch.randn(dim, device="cuda").to(dtype)
    tokens = torch.randint(0, vocab, (rows,), device="cuda")
    torch.empty(2 * rows * dim + 1, device="cuda").fill_(float("nan"))  # poison the next allocations
    x, y = ext.embedding_rms_norm(tokens, table, weight, EPS)
    torch.cuda.synchronize()
    assert torch.equal(x, table[tokens])
    assert torch.isfinite(y).all()
    assert relative_error(y, reference_rms_norm(x, weight)) < TOLERANCE[dtype]
    # The same bits as the gather followed by the plain norm, which the model used before.
    assert torch.equal(y, ext.rms_norm(table[tokens], weight, EPS))
    for m in random.sample(range(rows), min(rows, 8)):
        assert torch.equal(ext.embedding_rms_norm(tokens[m:m + 1], table, weight, EPS)[1][0], y[m])


def test_embedding_rms_norm_marks_tokens_outside_the_table(ext):
    table = torch.randn(100, 256, device="cuda").to(torch.bfloat16)
    weight = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    tokens = torch.tensor([5, 100, -1, 99], device="cuda")
    x, y = ext.embedding_rms_norm(tokens, table, weight, EPS)
    torch.cuda.synchronize()
    for m in (1, 2):
        assert torch.isnan(x[m]).all() and torch.isnan(y[m]).all()
    assert torch.equal(x[[0, 3]], table[[5, 99]]) and torch.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("features", [3072, 6144, 9728, 12288, 1000, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul(ext, dtype, features):
    rows = random.randint(1, 64)
    # A strided view, as the kernel may get it.
    wide = torch.randn(rows, 2 * features + 8, device="cuda").mul_(3.0).to(dtype)
    gate_up = wide[:, :2 * features]
    torch.empty(rows * features // 2 + 1, device="cuda").fill_(float("nan"))
    y = ext.silu_mul(gate_up)
    torch.cuda.synchronize()
    gate, up = gate_up.double().chunk(2, dim=-1)
    reference = gate * torch.sigmoid(gate) * up
    assert torch.isfinite(y).all()
    # One rounding of an fp32 result: within one unit in the last place of the reference.
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    assert ((y.double() - reference).abs() <= ulp * reference.abs() + 1e-6).all()
    for m in random.sample(range(rows), min(rows, 8)):
        assert torch.equal(ext.silu_mul(gate_up[m:m + 1])[0], y[m]), f"row {m} of {rows}"


def reference_rope(x, cos_sin):
    half = x.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_table(max_positions, head_dim):
    inv_freq = 1.0 / (1000000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    angles = torch.arange(max_positions, device="cuda").float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous()


class QkCase:
    def __init__(self, dtype, head_dim, q_heads, kv_heads, rows, max_positions=40000):
        self.dims = (q_heads, kv_heads, head_dim)
        width = (q_heads + 2 * kv_heads) * head_dim
        # q, k, v are views into one fused projection output, as in the model.
        self.qkv = torch.randn(rows, width, device="cuda").mul_(2.0).to(dtype)
        self.q = self.qkv[:, :q_heads * head_dim].view(rows, q_heads, head_dim)
        self.k = self.qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
        self.v = self.qkv[:, (q_heads + kv_heads) * head_dim:].view(rows, kv_heads, head_dim)
        self.q_norm = torch.randn(head_dim, device="cuda").to(dtype)
        self.k_norm = torch.randn(head_dim, device="cuda").to(dtype)
        self.table = rope_table(max_positions, head_dim)
        self.capacity = 2 * rows + 300

    def run(self, ext, position, dst, rows=slice(None)):
        q_heads, kv_heads, head_dim = self.dims
        k_dst = torch.full((self.capacity, kv_heads, head_dim), float("nan"), device="cuda", dtype=self.q.dtype)
        v_dst = torch.full_like(k_dst, float("nan"))
        positions_start = torch.tensor([position], dtype=torch.int32, device="cuda")
        dst_start = torch.tensor([dst], dtype=torch.int32, device="cuda")
        q_out = ext.qk_norm_rope_store(self.q[rows], self.k[rows], self.v[rows], self.q_norm, self.k_norm,
                                       self.table, positions_start, k_dst, v_dst, dst_start, EPS)
        torch.cuda.synchronize()
        return q_out, k_dst, v_dst


@pytest.mark.parametrize("heads", [(32, 8), (16, 8), (8, 8)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_rope_store(ext, dtype, head_dim, heads):
    rows = random.randint(1, 64)
    case = QkCase(dtype, head_dim, *heads, rows)
    position, dst = random.randint(0, 39000), random.randint(0, case.capacity - rows)
    q_out, k_dst, v_dst = case.run(ext, position, dst)
    cos_sin = case.table[position:position + rows]
    q_ref = reference_rope(reference_rms_norm(case.q, case.q_norm), cos_sin)
    k_ref = reference_rope(reference_rms_norm(case.k, case.k_norm), cos_sin)
    assert q_out.shape == case.q.shape and q_out.is_contiguous()
    assert relative_error(q_out, q_ref) < TOLERANCE[dtype]
    assert relative_error(k_dst[dst:dst + rows], k_ref) < TOLERANCE[dtype]
    assert torch.equal(v_dst[dst:dst + rows], case.v)
    # Nothing outside the destination rows is touched.
    outside = torch.ones(case.capacity, dtype=torch.bool, device="cuda")
    outside[dst:dst + rows] = False
    assert torch.isnan(k_dst[outside]).all() and torch.isnan(v_dst[outside]).all()
    # Row invariance: row m alone, at position + m and destination dst + m, gives the same bits.
    for m in random.sample(range(rows), min(rows, 6)):
        q_one, k_one, v_one = case.run(ext, position + m, dst + m, rows=slice(m, m + 1))
        assert torch.equal(q_one[0], q_out[m])
        assert torch.equal(k_one[dst + m], k_dst[dst + m])
        assert torch.equal(v_one[dst + m], v_dst[dst + m])


def run_accept(ext, drafts, targets, start_length):
    cache_len = torch.tensor([start_length], dtype=torch.int32, device="cuda")
    emitted = torch.full((targets.shape[0] + 1,), -7, dtype=torch.int64, device="cuda")
    next_anchor = torch.full((1,), -7, dtype=torch.int64, device="cuda")
    ext.accept(drafts, targets, cache_len, emitted, next_anchor)
    torch.cuda.synchronize()
    assert torch.equal(emitted[1:], targets)
    return cache_len.item(), emitted[0].item(), next_anchor.item()


@pytest.mark.parametrize("rows", [1, 2, 17, 32, 33, 64])
def test_accept(ext, rows):
    for _ in range(8):
        targets = torch.randint(0, 151936, (rows,), device="cuda")
        drafts = targets[:rows - 1].clone()
        accepted = random.randint(0, rows - 1)
        if accepted < rows - 1:
            drafts[accepted] = (drafts[accepted] + random.randint(1, 1000)) % 151936
            # Later mismatches or matches must not matter.
            tail = torch.randint(0, 2, (rows - 1 - accepted - 1,), device="cuda").bool()
            drafts[accepted + 1:][tail] += 1
        start = random.randint(0, 30000)
        assert run_accept(ext, drafts, targets, start) == (
            start + accepted + 1, accepted + 1, targets[accepted].item())
