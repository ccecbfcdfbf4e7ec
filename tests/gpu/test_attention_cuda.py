"""The CUDA attention kernel: accuracy against an fp32 reference and bitwise row invariance."""

import math
import random

import pytest
import torch

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
# (q_heads, kv_heads): Qwen3-8B, Qwen3-1.7B/4B-like, multi-head, and a wide group of 8.
HEADS = [(32, 8), (16, 8), (8, 8), (16, 2)]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
CHUNK = 1024  # the kernel's fixed chunk of absolute key positions; contexts below straddle its edges
SPLIT = 128  # the kernel's unit of one online softmax (an eighth of a chunk)
# Below this many warps of whole-chunk work ((chunk, kv head, vector tile) CTAs of 4 warps, 64 query
# vectors each) the kernel gives each split its own CTA.
WHOLE_CHUNK_MIN_WARPS = 512


def split_schedule_limit(rows, q_heads, kv_heads):
    """Keys up to which a call of `rows` rows takes the one-CTA-per-split schedule."""
    vector_tiles = -(-rows * (q_heads // kv_heads) // 64)
    return (WHOLE_CHUNK_MIN_WARPS - 1) // (kv_heads * vector_tiles * 4) * CHUNK


def random_context(limit=32768 - 64):
    """Log-uniform over 0..32K with extra weight on chunk, split and tile edges."""
    if random.random() < 0.3:
        edge = random.choice([SPLIT, CHUNK]) * random.randint(0, 31)
        return max(0, random.choice([1, 2, 63, 64]) + edge - random.randint(0, 2))
    return min(limit, int(math.exp(random.uniform(0, math.log(limit)))))


class Case:
    """Random cache, queries and block keys. Cache rows past the live keys hold NaN so that any read of
    them shows in the output; a bidirectional block's keys live only in k_block / v_block."""

    def __init__(self, dtype, head_dim, q_heads, kv_heads, rows, cache_len, causal, capacity=None):
        device = "cuda"
        self.rows, self.cache_len, self.causal = rows, cache_len, causal
        self.scale = 1.0 / math.sqrt(head_dim)
        live = cache_len + rows
        capacity = capacity or live + random.randint(0, 700)
        query_scale = random.choice([1.0, 4.0])  # 4: peaked softmax, exercises the running max
        self.q = torch.randn(rows, q_heads, head_dim, device=device).mul_(query_scale).to(dtype)
        self.k_cache = torch.randn(capacity, kv_heads, head_dim, device=device).to(dtype)
        self.v_cache = torch.randn(capacity, kv_heads, head_dim, device=device).to(dtype)
        if causal:
            self.k_block = self.v_block = None
            self.k_cache[live:] = float("nan")
            self.v_cache[live:] = float("nan")
        else:
            self.k_block = torch.randn(rows, kv_heads, head_dim, device=device).to(dtype)
            self.v_block = torch.randn(rows, kv_heads, head_dim, device=device).to(dtype)
            self.k_cache[cache_len:] = float("nan")
            self.v_cache[cache_len:] = float("nan")
        self.length = torch.tensor([cache_len], dtype=torch.int32, device=device)

    def run(self, ext, q=None, cache_len=None):
        q = self.q if q is None else q
        length = self.length if cache_len is None else torch.tensor([cache_len], dtype=torch.int32, device="cuda")
        poison_allocator(q.numel() * q.element_size())
        out = ext.attention(q, self.k_cache, self.v_cache, length, self.k_block, self.v_block, self.causal,
                            self.scale)
        torch.cuda.synchronize()
        return out

    def reference(self):
        rows, q_heads, _ = self.q.shape
        group = q_heads // self.k_cache.shape[1]
        live = self.cache_len + rows
        if self.causal:
            keys, values = self.k_cache[:live], self.v_cache[:live]
        else:
            keys = torch.cat([self.k_cache[:self.cache_len], self.k_block])
            values = torch.cat([self.v_cache[:self.cache_len], self.v_block])
        keys = keys.float().repeat_interleave(group, dim=1)
        values = values.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("rhd,nhd->hrn", self.q.float(), keys) * self.scale
        if self.causal:
            position = torch.arange(live, device="cuda")
            visible = position[None, :] <= self.cache_len + torch.arange(rows, device="cuda")[:, None]
            scores = scores.masked_fill(~visible[None], float("-inf"))
        return torch.einsum("hrn,nhd->rhd", scores.softmax(-1), values)


def poison_allocator(nbytes):
    """The next allocation of about this size reuses NaN-filled memory, so unwritten output shows."""
    torch.empty(nbytes // 4 + 1, dtype=torch.float32, device="cuda").fill_(float("nan"))


def relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_fp32_reference(ext, dtype, head_dim, heads, causal):
    contexts = [random_context(), random_context(), random.randint(0, 3), random.randint(30000, 32768 - 64)]
    for cache_len in contexts:
        rows = random.choice([1, random.randint(1, 64), 32, 64])
        case = Case(dtype, head_dim, *heads, rows, cache_len, causal)
        out = case.run(ext)
        assert out.shape == case.q.shape and out.dtype == dtype
        assert torch.isfinite(out).all(), f"non-finite output at context {cache_len}, rows {rows}"
        error = relative_error(out, case.reference())
        assert error < TOLERANCE[dtype], f"context {cache_len}, rows {rows}: relative error {error:.2e}"


def check_causal_row_invariance(ext, dtype, head_dim, heads, rows, cache_len):
    """Row m of a rows-row causal call == a one-row call at cache_len + m over the same cache."""
    case = Case(dtype, head_dim, *heads, rows, cache_len, causal=True)
    block = case.run(ext)
    assert torch.isfinite(block).all()
    for m in range(rows):
        single = case.run(ext, q=case.q[m:m + 1].clone(), cache_len=cache_len + m)
        assert torch.equal(single[0], block[m]), (
            f"row {m} of {rows} at context {cache_len} differs from the one-row call "
            f"(max diff {(single[0].float() - block[m].float()).abs().max().item():.3e})")


@pytest.mark.parametrize("rows", range(1, 65))
def test_causal_row_invariance_every_block_size(ext, rows):
    check_causal_row_invariance(ext, torch.bfloat16, 128, (32, 8), rows, random_context())


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_row_invariance_configurations(ext, dtype, head_dim, heads):
    for rows in (random.randint(2, 64), 33):
        # One context just below a chunk edge: the block's rows then fold different numbers of chunks.
        for cache_len in (random_context(), CHUNK * random.randint(1, 8) - random.randint(1, rows)):
            check_causal_row_invariance(ext, dtype, head_dim, heads, rows, cache_len)


@pytest.mark.parametrize("heads", [(32, 8), (16, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_row_invariance_across_schedules(ext, dtype, heads):
    """A block long enough for whole chunks against one-row calls that split them: the schedules fold the
    same splits in the same order, so the bits must agree."""
    rows = random.randint(17, 64)
    block_limit, single_limit = split_schedule_limit(rows, *heads), split_schedule_limit(1, *heads)
    if block_limit >= single_limit:
        pytest.skip(f"{heads}: one schedule for 1 and {rows} rows")
    for cache_len in (random.randint(block_limit, single_limit - rows), block_limit + random.randint(-rows, 0),
                      single_limit - random.randint(0, rows)):
        check_causal_row_invariance(ext, dtype, 128, heads, rows, cache_len)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidirectional_rows_are_independent(ext, dtype, head_dim, heads):
    """A bidirectional row's bits depend only on its own query and the keys: repeating the call,
    permuting the rows (each lands in another warp / CTA slot), or changing the other rows' queries
    leaves them unchanged."""
    rows = random.randint(2, 64)
    case = Case(dtype, head_dim, *heads, rows, random_context(), causal=False)
    out = case.run(ext)
    assert torch.equal(out, case.run(ext))
    permutation = torch.randperm(rows, device="cuda")
    assert torch.equal(case.run(ext, q=case.q[permutation].contiguous()), out[permutation])
    other = torch.randn_like(case.q, dtype=torch.float32).to(dtype)
    keep = random.randrange(rows)
    other[keep] = case.q[keep]
    assert torch.equal(case.run(ext, q=other)[keep], out[keep])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_last_causal_row_equals_bidirectional_rows(ext, dtype, head_dim):
    """The last causal row and every bidirectional row see the same keys in the same positions, read
    from the cache in one case and from k_block / v_block in the other: the bits must agree."""
    rows, cache_len = random.randint(1, 64), random_context()
    causal = Case(dtype, head_dim, 32, 8, rows, cache_len, causal=True)
    bidirectional = Case(dtype, head_dim, 32, 8, rows, cache_len, causal=False)
    bidirectional.q = causal.q
    bidirectional.k_cache[:cache_len] = causal.k_cache[:cache_len]
    bidirectional.v_cache[:cache_len] = causal.v_cache[:cache_len]
    bidirectional.k_block = causal.k_cache[cache_len:cache_len + rows].clone()
    bidirectional.v_block = causal.v_cache[cache_len:cache_len + rows].clone()
    last = causal.run(ext)[rows - 1]
    every = bidirectional.run(ext)
    query = causal.q[rows - 1:rows]
    # The same query in every row: every bidirectional row must equal the last causal row.
    same_query = bidirectional.run(ext, q=query.expand(rows, -1, -1).contiguous())
    assert torch.isfinite(every).all()
    for m in range(rows):
        assert torch.equal(same_query[m], last), f"row {m} of {rows} at context {cache_len}"


def test_cache_length_past_capacity_is_nan(ext):
    """A device-side length the launch was not sized for cannot be rejected on the host (no sync):
    the kernel must then write NaN rather than attend over keys it never read."""
    case = Case(torch.bfloat16, 128, 32, 8, 8, 1000, causal=True, capacity=1004)
    out = case.run(ext)
    assert torch.isnan(out).all()


def test_graph_replay_follows_device_length(ext):
    """The launch reads cache_len on the device: a captured graph replays at a new length."""
    # Capacity past the split schedule's limit: the replays cross from one schedule to the other.
    limit = split_schedule_limit(4, 32, 8)
    case = Case(torch.bfloat16, 128, 32, 8, 4, 100, causal=True, capacity=limit + 2048)
    case.k_cache[:] = torch.randn_like(case.k_cache, dtype=torch.float32).to(torch.bfloat16)
    case.v_cache[:] = torch.randn_like(case.v_cache, dtype=torch.float32).to(torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        case.run(ext)  # warm-up outside the capture (allocator, function attributes)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = ext.attention(case.q, case.k_cache, case.v_cache, case.length, None, None, True, case.scale)
    for cache_len in (100, 2000, limit + 1024):
        case.length.fill_(cache_len)
        graph.replay()
        torch.cuda.synchronize()
        case.cache_len = cache_len
        assert torch.equal(out, case.run(ext)), f"graph replay at length {cache_len}"
        assert relative_error(out, case.reference()) < TOLERANCE[torch.bfloat16]
