"""The row-invariant decode-phase linear kernel (csrc/cuda/linear.cu) on the GPU.

Checks against an fp32 reference at random shapes, bitwise row invariance (an M-row call equals the
single-row calls stacked, M = 1..64) at every Qwen3 decode projection shape, ragged N / K, row-strided
and misaligned x, and the rejection of bad arguments. Inputs are fresh random draws each run; outputs
are poisoned with NaN before each call so an unwritten element fails.

The kernel is the standalone library named by ORTHRUS_LINEAR_LIB (see tests/gpu/run_linear_device.sh)
or else orthrus_ext.linear.
"""

import importlib.util
import math
import os
import random

import pytest
import torch

pytestmark = pytest.mark.gpu

_BENCHMARK = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "linear_bandwidth.py")
_spec = importlib.util.spec_from_file_location("linear_bandwidth", _BENCHMARK)
linear_bandwidth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(linear_bandwidth)

DTYPES = (torch.bfloat16, torch.float16)
# Small shapes of a tiny default model plus awkward ones (N, K).
TINY_SHAPES = [(256, 256), (768, 256), (512, 512), (1024, 512), (1536, 1024), (4096, 1024), (1024, 4096),
               (320, 64), (64, 320)]


@pytest.fixture(scope="module")
def linear():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return linear_bandwidth.load_linear()


@pytest.fixture
def rng():
    seed = random.SystemRandom().randrange(1 << 62)
    print(f"seed {seed}")
    generator = torch.Generator(device="cuda")
    generator.manual_seed(seed)
    return generator


def random_operands(rows, out_features, in_features, dtype, generator):
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype, generator=generator)
    return x, weight / math.sqrt(in_features)


def run(linear, x, weight):
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"), device="cuda", dtype=x.dtype)
    return linear(x, weight, out=out)


def bits(tensor):
    return tensor.contiguous().view(torch.int16)


def assert_close_to_reference(out, x, weight):
    assert not out.isnan().any(), "output elements left unwritten (still NaN)"
    reference = x.float() @ weight.float().t()
    error = (out.float() - reference).norm() / reference.norm().clamp_min(1e-30)
    # One rounding of the fp32 sum to the output type: 2^-9 (bf16) / 2^-12 (fp16) relative, per element.
    limit = 4e-3 if x.dtype == torch.bfloat16 else 6e-4
    assert error < limit, f"relative error {error:.2e} over {limit:.0e}"


def assert_row_invariant(linear, x, weight):
    single = torch.cat([run(linear, x[m:m + 1], weight) for m in range(x.shape[0])])
    assert not single.isnan().any()
    for rows in range(1, x.shape[0] + 1):
        block = run(linear, x[:rows], weight)
        mismatch = (bits(block) != bits(single[:rows])).any(dim=1).nonzero().flatten().tolist()
        assert not mismatch, f"M={rows}: rows {mismatch[:8]} differ from the single-row results"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp32_reference_at_random_shapes(linear, rng, dtype):
    draw = random.Random(int(torch.randint(1 << 30, (1,), generator=rng, device="cuda").item()))
    for _ in range(24):
        rows = draw.randint(1, 64)
        out_features = draw.choice([draw.randint(1, 300), draw.randint(300, 5000)])
        in_features = 8 * draw.choice([draw.randint(1, 40), draw.randint(40, 800)])
        x, weight = random_operands(rows, out_features, in_features, dtype, rng)
        assert_close_to_reference(run(linear, x, weight), x, weight)


@pytest.mark.parametrize("name,out_features,in_features", linear_bandwidth.model_projections())
def test_row_invariant_at_model_shapes(linear, rng, name, out_features, in_features):
    x, weight = random_operands(64, out_features, in_features, torch.bfloat16, rng)
    assert_row_invariant(linear, x, weight)
    assert_close_to_reference(run(linear, x, weight), x, weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,in_features", TINY_SHAPES)
def test_row_invariant_at_small_shapes(linear, rng, dtype, out_features, in_features):
    x, weight = random_operands(64, out_features, in_features, dtype, rng)
    assert_row_invariant(linear, x, weight)
    assert_close_to_reference(run(linear, x, weight), x, weight)


@pytest.mark.parametrize("out_features", [1, 7, 63, 65, 129, 1001])
@pytest.mark.parametrize("in_features", [8, 24, 40, 264, 520, 2056])
def test_ragged_shapes(linear, rng, out_features, in_features):
    for rows in (1, 5, 64):
        x, weight = random_operands(rows, out_features, in_features, torch.bfloat16, rng)
        assert_close_to_reference(run(linear, x, weight), x, weight)
    x, weight = random_operands(17, out_features, in_features, torch.float16, rng)
    assert_row_invariant(linear, x, weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 8, 3], ids=["aligned", "aligned-offset", "misaligned"])
def test_strided_x_gives_the_same_bits(linear, rng, dtype, offset):
    # x as a column slice of a wider tensor (a fused projection's output, say): 16-byte copies when the
    # rows are 16-byte aligned, element copies otherwise; both must give the contiguous result's bits.
    out_features, in_features = 1000, 1032
    wide = torch.randn(64, in_features + 40, device="cuda", dtype=dtype, generator=rng)
    x = wide[:, offset:offset + in_features]
    weight = random_operands(1, out_features, in_features, dtype, rng)[1]
    for rows in (1, 33, 64):
        strided = run(linear, x[:rows], weight)
        contiguous = run(linear, x[:rows].contiguous(), weight)
        assert torch.equal(bits(strided), bits(contiguous))
    assert_close_to_reference(strided, x, weight)


def test_small_cases_for_sanitizer(linear, rng):
    # Kept small so that compute-sanitizer can run it: tails in N and K, both x paths, both dtypes.
    for dtype in DTYPES:
        for rows, out_features, in_features in [(1, 65, 264), (9, 130, 520), (64, 64, 256), (33, 3, 8)]:
            x, weight = random_operands(rows, out_features, in_features, dtype, rng)
            assert_close_to_reference(run(linear, x, weight), x, weight)
            wide = torch.randn(rows, in_features + 5, device="cuda", dtype=dtype, generator=rng)
            strided = wide[:, 1:1 + in_features]
            assert_close_to_reference(run(linear, strided, weight), strided, weight)


def test_splits_agree_with_reference(linear, rng):
    # Every split-K cluster size computes the same function (only the summation order changes).
    if not isinstance(linear, linear_bandwidth._StandaloneLinear):
        pytest.skip("split override needs the standalone library (ORTHRUS_LINEAR_LIB)")
    x, weight = random_operands(40, 700, 2048 + 72, torch.bfloat16, rng)
    for split in range(1, 9):
        out = torch.full((40, 700), float("nan"), device="cuda", dtype=torch.bfloat16)
        assert_close_to_reference(linear(x, weight, out=out, split=split), x, weight)


def test_rejects_bad_arguments(linear, rng):
    if not isinstance(linear, linear_bandwidth._StandaloneLinear):
        pytest.skip("return codes are visible through the standalone library only")
    x, weight = random_operands(65, 128, 256, torch.bfloat16, rng)
    out = torch.empty(65, 128, device="cuda", dtype=torch.bfloat16)
    assert linear.call(x, weight, out) != 0, "65 rows accepted"
    x12, weight12 = random_operands(4, 128, 12, torch.bfloat16, rng)
    assert linear.call(x12, weight12, out[:4]) != 0, "in_features 12 (not a multiple of 8) accepted"
    x32 = torch.randn(4, 256, device="cuda")
    assert linear.call(x32, weight.float(), out[:4]) != 0, "float32 accepted"
    misaligned = torch.empty(128 * 256 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(128, 256)
    assert linear.call(x[:4], misaligned, out[:4]) != 0, "weights off a 16-byte boundary accepted"
    assert linear.call(x[:4], weight, out[:4], split=9) != 0, "split 9 accepted"
    torch.cuda.synchronize()
