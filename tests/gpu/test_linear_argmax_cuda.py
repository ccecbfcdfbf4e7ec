"""linear_argmax on the GPU: the linear kernel's kArgmax epilogue (csrc/cuda/linear.cuh) and the kernel
that reduces its per-tile keys (csrc/cuda/linear.cu).

Every row's token must be torch.argmax of orthrus_ext.linear's output, exactly: the same sums and
rounding, the smallest column among equal maxima, -0.0 equal to +0.0, the first NaN above everything. At
Qwen3's lm_head shapes and ragged ones, with ties and special values at random columns (so in any tile),
and row-invariant. Inputs are fresh random draws each run, and before each call the memory that the op's
output and key workspace most likely get from the caching allocator is poisoned, so that a token or key
left unwritten shows up.
"""

import math
import random

import pytest
import torch

from test_ext_cpu import first_maximum, special_values_case, tie_case

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
VOCAB = 151936
QWEN3_HIDDEN = [2048, 2560, 4096]  # Qwen3 1.7B, 4B, 8B: lm_head is [VOCAB, hidden]


def operands(rows, out_features, in_features, dtype):
    # A row-strided x, as slices of the residual stream may be.
    x = torch.randn(rows, in_features + 8, device="cuda").to(dtype)[:, 8:]
    weight = (torch.randn(out_features, in_features, device="cuda") / math.sqrt(in_features)).to(dtype)
    return x, weight


def cpu_generator():
    # For the shared case builders of test_ext_cpu; seeded from the per-test seed the conftest prints.
    return torch.Generator().manual_seed(random.randrange(2**31))


def linear_argmax(ext, x, weight):
    """ext.linear_argmax after freeing poisoned blocks of the sizes of its output and key workspace: a token
    left unwritten reads -7, a key left unwritten (0xFFFFFFFF00000000, above every key but a NaN's) wins
    as column 2^32 - 1."""
    rows, tiles = x.shape[0], -(-weight.shape[0] // 64)
    poison = [torch.full((rows,), -7, dtype=torch.int64, device="cuda"),
              torch.full((rows * tiles,), -(1 << 32), dtype=torch.int64, device="cuda")]
    del poison
    tokens = ext.linear_argmax(x, weight)
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,) and tokens.device == x.device
    return tokens


def check(ext, x, weight):
    """The tokens, which must be torch.argmax of ext.linear's logits, and those logits."""
    tokens = linear_argmax(ext, x, weight)
    logits = ext.linear(x, weight)
    assert torch.equal(tokens, logits.argmax(-1))
    return tokens, logits


@pytest.mark.parametrize("hidden", QWEN3_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lm_head_shapes(ext, dtype, hidden):
    weight = operands(1, VOCAB, hidden, dtype)[1]
    for rows in (1, 32, 64, random.randint(2, 63)):
        x = operands(rows, VOCAB, hidden, dtype)[0]
        tokens, logits = check(ext, x, weight)
        assert torch.equal(tokens.cpu(), first_maximum(logits.cpu()))
        for m in random.sample(range(rows), min(rows, 4)):
            assert torch.equal(linear_argmax(ext, x[m:m + 1], weight), tokens[m:m + 1]), f"row {m} of {rows}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_shapes(ext, dtype):
    for _ in range(20):
        rows = random.randint(1, 64)
        out_features = random.choice([random.randint(1, 300), random.randint(300, 40000)])
        in_features = 8 * random.choice([random.randint(1, 40), random.randint(40, 600)])
        check(ext, *operands(rows, out_features, in_features, dtype))


@pytest.mark.parametrize("out_features", [1, 7, 63, 64, 65, 1001, 4097])
@pytest.mark.parametrize("in_features", [8, 264, 2056])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ragged_shapes_are_row_invariant(ext, dtype, in_features, out_features):
    x, weight = operands(64, out_features, in_features, dtype)
    tokens, _ = check(ext, x, weight)
    for rows in sorted(random.sample(range(1, 64), 6)):
        assert torch.equal(linear_argmax(ext, x[:rows], weight), tokens[:rows]), f"rows={rows}"
    single = torch.cat([linear_argmax(ext, x[m:m + 1], weight) for m in range(64)])
    assert torch.equal(single, tokens), "single-row calls differ from the 64-row call"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_smallest_column(ext, dtype):
    gen = cpu_generator()
    for out_features in (130, 5000, VOCAB):
        x, weight = tie_case(gen, random.randint(1, 64), out_features, dtype)
        tokens, logits = check(ext, x.cuda(), weight.cuda())
        logits = logits.cpu()
        assert bool(((logits == logits.max(-1, keepdim=True).values).sum(-1) >= 2).all())
        assert torch.equal(tokens.cpu(), first_maximum(logits))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_infinities_and_signed_zeros(ext, dtype):
    gen = cpu_generator()
    for out_features in (2, 100, 5000, VOCAB):
        special_x, weight, expected = special_values_case(gen, dtype, out_features)
        # The four special rows at random places among ordinary ones.
        rows = random.randint(4, 64)
        places = random.sample(range(rows), 4)
        x = torch.randn(rows, special_x.shape[1]).to(dtype)
        x[places] = special_x
        x, weight = x.cuda(), weight.cuda()
        tokens = check(ext, x, weight)[0][places].cpu()
        # The -0.0 / +0.0 row only as the check above: its bfloat16 products (2^-140) are fp32 subnormals,
        # which the tensor cores may flush, and then the linear's own zeros decide.
        special = 4 if dtype == torch.float16 else 3
        assert torch.equal(tokens[:special], expected[:special])
        for place, token in zip(places, tokens):
            assert torch.equal(linear_argmax(ext, x[place:place + 1], weight).cpu(), token[None]), f"row {place}"
