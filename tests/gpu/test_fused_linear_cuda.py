"""The linear kernel's fused epilogues (csrc/cuda/linear.cuh) on the GPU: linear_silu_mul,
linear_qk_norm_rope_store, and the deferred norm (linear_add_deferred_norm and those two given its sums).

Each must give the bits of the separate calls it replaces (linear, then silu_mul / qk_norm_rope_store /
add_rms_norm), be row-invariant (an M-row call equals the single-row calls, each at its own position and
destination row), stay close to a float64 reference, and write nothing outside its destination rows.
Inputs are fresh random draws each run; every output buffer is poisoned with NaN first.
"""

import importlib.util
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from test_norm_accept_cuda import EPS, reference_rms_norm, reference_rope, rope_table

pytestmark = pytest.mark.gpu

_BENCHMARK = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "linear_bandwidth.py")
_spec = importlib.util.spec_from_file_location("linear_bandwidth", _BENCHMARK)
linear_bandwidth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(linear_bandwidth)

DTYPES = [torch.bfloat16, torch.float16]
# Relative error (norm over the whole output) of one rounding to the output type, with room for the fp32
# sums and, after a norm, its rounded input.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
QWEN3 = linear_bandwidth.QWEN3_SHAPES  # name -> (hidden, q_heads, kv_heads, head_dim, intermediate)


def bits(tensor):
    return tensor.contiguous().view(torch.int16)


def relative_error(out, reference):
    assert not out.isnan().any(), "output elements left unwritten (still NaN)"
    return ((out.double() - reference).norm() / reference.norm()).item()


def operands(rows, out_features, in_features, dtype):
    # A row-strided x, as the model's residual-stream views are not; the kernel must not care.
    x = torch.randn(rows, in_features + 8, device="cuda").to(dtype)[:, 8:]
    weight = (torch.randn(out_features, in_features, device="cuda") / math.sqrt(in_features)).to(dtype)
    return x, weight


# ---------------------------------------------------------------------------------------------------------
# linear_silu_mul


def check_silu_mul(ext, rows, features, in_features, dtype, compare_separate=True, deferred=None):
    """deferred: a DeferredNorm whose weighted rows are x, and whose sums the kernel is given."""
    x, weight = operands(rows, 2 * features, in_features, dtype)
    square_sums, scale = None, 1.0
    if deferred is not None:
        x, square_sums, scale = deferred.weighted, deferred.square_sums, deferred.scale()
    y = ext.linear_silu_mul(x, weight, square_sums, EPS)
    torch.cuda.synchronize()
    assert y.shape == (rows, features)
    gate, up = (x.double() @ weight.double().t() * scale).chunk(2, dim=-1)
    assert relative_error(y, gate * torch.sigmoid(gate) * up) < TOLERANCE[dtype]
    if compare_separate:
        assert torch.equal(bits(y), bits(ext.silu_mul(ext.linear(x, weight))))
    for m in random.sample(range(rows), min(rows, 6)):
        one = ext.linear_silu_mul(x[m:m + 1], weight, None if square_sums is None else square_sums[m:m + 1], EPS)
        assert torch.equal(bits(one[0]), bits(y[m])), f"row {m} of {rows}"


@pytest.mark.parametrize("model", sorted(QWEN3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_at_model_shapes(ext, dtype, model):
    hidden, _, _, _, intermediate = QWEN3[model]
    for rows in (1, 32, random.randint(2, 64)):
        check_silu_mul(ext, rows, intermediate, hidden, dtype)


@pytest.mark.parametrize("features,in_features", [(1, 8), (31, 24), (33, 264), (100, 520), (1000, 2056)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_at_ragged_shapes(ext, dtype, features, in_features):
    check_silu_mul(ext, random.randint(1, 64), features, in_features, dtype)


# ---------------------------------------------------------------------------------------------------------
# linear_qk_norm_rope_store


class HeadsCase:
    def __init__(self, dtype, in_features, q_heads, kv_heads, head_dim, rows):
        self.heads = (q_heads, kv_heads, head_dim)
        self.x, self.weight = operands(rows, (q_heads + 2 * kv_heads) * head_dim, in_features, dtype)
        self.q_norm = (1 + 0.3 * torch.randn(head_dim, device="cuda")).to(dtype)
        self.k_norm = (1 + 0.3 * torch.randn(head_dim, device="cuda")).to(dtype)
        self.table = rope_table(40000, head_dim)
        self.capacity = 2 * rows + 100

    def destinations(self):
        _, kv_heads, head_dim = self.heads
        k_dst = torch.full((self.capacity, kv_heads, head_dim), float("nan"), device="cuda", dtype=self.x.dtype)
        return k_dst, torch.full_like(k_dst, float("nan"))

    def defer(self, deferred):
        """Project a deferred norm's weighted rows, given its sums, instead of x."""
        self.x, self.square_sums, self.scale = deferred.weighted, deferred.square_sums, deferred.scale()

    square_sums, scale = None, 1.0

    def fused(self, ext, position, dst, rows=slice(None)):
        k_dst, v_dst = self.destinations()
        square_sums = None if self.square_sums is None else self.square_sums[rows]
        q_out = ext.linear_qk_norm_rope_store(self.x[rows], self.weight, self.q_norm, self.k_norm, self.table,
                                              scalar(position), k_dst, v_dst, scalar(dst), EPS, square_sums, EPS)
        torch.cuda.synchronize()
        return q_out, k_dst, v_dst

    def separate(self, ext, position, dst):
        q_heads, kv_heads, head_dim = self.heads
        qkv = ext.linear(self.x, self.weight)
        q, k, v = (part.view(qkv.shape[0], -1, head_dim)
                   for part in qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
        k_dst, v_dst = self.destinations()
        q_out = ext.qk_norm_rope_store(q, k, v, self.q_norm, self.k_norm, self.table, scalar(position), k_dst,
                                       v_dst, scalar(dst), EPS)
        return q_out, k_dst, v_dst

    def reference(self, position):
        q_heads, kv_heads, head_dim = self.heads
        qkv = self.x.double() @ self.weight.double().t() * self.scale
        rows = qkv.shape[0]
        q, k, v = (part.view(rows, -1, head_dim)
                   for part in qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
        cos_sin = self.table[position:position + rows].double()
        return (reference_rope(reference_rms_norm(q, self.q_norm).double(), cos_sin),
                reference_rope(reference_rms_norm(k, self.k_norm).double(), cos_sin), v)


def scalar(value):
    return torch.tensor([value], dtype=torch.int32, device="cuda")


def check_heads(ext, case, rows, compare_separate=True):
    position, dst = random.randint(0, 39000), random.randint(0, case.capacity - rows)
    q_out, k_dst, v_dst = case.fused(ext, position, dst)
    stored = slice(dst, dst + rows)
    q_ref, k_ref, v_ref = case.reference(position)
    dtype = case.x.dtype
    assert relative_error(q_out, q_ref) < TOLERANCE[dtype]
    assert relative_error(k_dst[stored], k_ref) < TOLERANCE[dtype]
    assert relative_error(v_dst[stored], v_ref) < TOLERANCE[dtype]
    outside = torch.ones(case.capacity, dtype=torch.bool, device="cuda")
    outside[stored] = False
    assert k_dst[outside].isnan().all() and v_dst[outside].isnan().all(), "wrote outside [dst, dst + rows)"
    if compare_separate:
        for fused, separate in zip((q_out, k_dst, v_dst), case.separate(ext, position, dst)):
            assert torch.equal(bits(fused), bits(separate))
    for m in random.sample(range(rows), min(rows, 6)):
        q_one, k_one, v_one = case.fused(ext, position + m, dst + m, rows=slice(m, m + 1))
        assert torch.equal(bits(q_one[0]), bits(q_out[m])), f"q row {m} of {rows}"
        assert torch.equal(bits(k_one[dst + m]), bits(k_dst[dst + m])), f"k row {m} of {rows}"
        assert torch.equal(bits(v_one[dst + m]), bits(v_dst[dst + m])), f"v row {m} of {rows}"


@pytest.mark.parametrize("model", sorted(QWEN3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heads_at_model_shapes(ext, dtype, model):
    hidden, q_heads, kv_heads, head_dim, _ = QWEN3[model]
    for rows in (1, 32, random.randint(2, 64)):
        check_heads(ext, HeadsCase(dtype, hidden, q_heads, kv_heads, head_dim, rows), rows)


@pytest.mark.parametrize("heads", [(32, 8), (16, 8), (8, 8), (4, 1), (2, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heads_at_small_shapes(ext, dtype, head_dim, heads):
    # in_features up to 1024: at most 4 chunks, so the split is the plain linear's (bits compared).
    rows, in_features = random.randint(1, 64), 8 * random.randint(1, 128)
    check_heads(ext, HeadsCase(dtype, in_features, *heads, head_dim, rows), rows)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_heads_with_a_capped_split(ext, head_dim):
    # Few heads and a long K: the plain linear would split K 8 ways, more than a cluster of whole 128-wide
    # heads can hold, so the fused kernel splits less. Its bits then differ from the separate calls', but
    # it must still be right and row-invariant.
    rows = random.randint(1, 64)
    check_heads(ext, HeadsCase(torch.bfloat16, 8192, 2, 1, head_dim, rows), rows,
                compare_separate=head_dim == 64)


def test_fused_forms_reject_an_unsupported_head_dim(ext):
    # In a child process, so that a crash while raising fails this test instead of ending the session: on
    # the H100 image of 2026-11-22 every error message with a number in it killed the interpreter until
    # bindings.cpp stopped formatting numbers through std::ostream.
    code = """
import torch, orthrus_ext as ext
d = dict(device="cuda", dtype=torch.bfloat16)
k_dst, norm = torch.zeros(4, 1, 32, **d), torch.ones(32, **d)
start = torch.zeros(1, dtype=torch.int32, device="cuda")
try:
    ext.linear_qk_norm_rope_store(torch.randn(1, 64, **d), torch.randn(96, 64, **d), norm, norm,
                                  torch.zeros(8, 32, device="cuda"), start, k_dst, torch.zeros_like(k_dst), start, 1e-6)
except ValueError as error:
    print("ValueError:", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the child died (exit {result.returncode}): {result.stderr[-400:]}"
    assert "ValueError: the CUDA kernels take head_dim 64 or 128, got 32" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# the deferred norm


class DeferredNorm:
    """linear_add_deferred_norm of random operands, checked against linear + add_rms_norm (the same
    residual bits), a float64 reference and its own single-row calls."""

    def __init__(self, ext, rows, dim, in_features, dtype):
        x, weight = operands(rows, dim, in_features, dtype)
        start = torch.randn(rows, dim, device="cuda").to(dtype)
        norm_weight = (1 + 0.3 * torch.randn(dim, device="cuda")).to(dtype)
        self.residual = start.clone()
        self.weighted, self.square_sums = ext.linear_add_deferred_norm(x, weight, self.residual, norm_weight)
        torch.cuda.synchronize()

        separate = start.clone()
        ext.add_rms_norm(separate, ext.linear(x, weight), norm_weight, EPS)
        assert torch.equal(bits(self.residual), bits(separate)), "residual differs from linear + add_rms_norm"
        assert torch.equal(bits(self.weighted), bits((self.residual.float() * norm_weight.float()).to(dtype)))
        squares = torch.nn.functional.pad(self.residual.double() ** 2, (0, -dim % 64)).view(rows, -1, 64).sum(-1)
        assert ((self.square_sums.double() - squares).abs() <= 1e-5 * squares).all()
        for m in random.sample(range(rows), min(rows, 6)):
            residual = start[m:m + 1].clone()
            weighted, square_sums = ext.linear_add_deferred_norm(x[m:m + 1], weight, residual, norm_weight)
            assert torch.equal(bits(residual[0]), bits(self.residual[m])), f"residual row {m} of {rows}"
            assert torch.equal(bits(weighted[0]), bits(self.weighted[m])), f"weighted row {m} of {rows}"
            assert torch.equal(square_sums[0].view(torch.int32), self.square_sums[m].view(torch.int32))

    def scale(self):
        """float64 [rows, 1]: the norm's row scale, from the residual itself."""
        return torch.rsqrt((self.residual.double() ** 2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("model", sorted(QWEN3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deferred_norm_at_model_shapes(ext, dtype, model):
    # The output and down projections produce it; the q | k | v and gate | up projections finish it.
    hidden, q_heads, kv_heads, head_dim, intermediate = QWEN3[model]
    for rows in (1, 32, random.randint(2, 64)):
        after_attention = DeferredNorm(ext, rows, hidden, q_heads * head_dim, dtype)
        check_silu_mul(ext, rows, intermediate, hidden, dtype, compare_separate=False, deferred=after_attention)
        after_mlp = DeferredNorm(ext, rows, hidden, intermediate, dtype)
        case = HeadsCase(dtype, hidden, q_heads, kv_heads, head_dim, rows)
        case.defer(after_mlp)
        check_heads(ext, case, rows, compare_separate=False)


@pytest.mark.parametrize("dim,in_features", [(8, 8), (56, 24), (72, 264), (200, 520), (1000, 2056)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deferred_norm_at_ragged_shapes(ext, dtype, dim, in_features):
    rows = random.randint(1, 64)
    deferred = DeferredNorm(ext, rows, dim, in_features, dtype)
    check_silu_mul(ext, rows, random.randint(1, 100), dim, dtype, compare_separate=False, deferred=deferred)
