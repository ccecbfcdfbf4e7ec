"""Generation semantics: acceptance really accepts, rollback, the diffusion pass leaves the cache alone,
stop conditions, streaming, stats."""

import pytest
import torch

import orthrus
from checkpoints import TINY_CONFIG, random_weights, write_checkpoint, write_tokenizer
from orthrus.cache import KVCache
from orthrus.decode import diffusion_drafts, prefill
from orthrus.model import Qwen3
from orthrus.runner import IterationRunner
from orthrus.sampling import SamplingParams

BLOCK = TINY_CONFIG["block_size"]


@pytest.fixture(scope="module")
def always_right(tmp_path_factory):
    """Final norm weight zero: every logit of both views is 0, every row ties on the same token, so every
    draft is what AR decoding emits."""
    weights = random_weights(TINY_CONFIG, orthrus=True, seed=1)
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])
    return orthrus.load(write_checkpoint(tmp_path_factory.mktemp("always_right"), weights=weights), device="cpu")


@pytest.mark.parametrize("params", [dict(), dict(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
def test_acceptance_accepts_whole_blocks_when_drafts_are_right(always_right, params):
    result = always_right.generate([1, 2, 3], max_new_tokens=10 * BLOCK + 1, mode="orthrus", **params)
    assert result.stats["tokens_per_iteration"] == BLOCK
    assert result.stats["accepted_histogram"] == {BLOCK: 10}
    assert result.tokens == always_right.generate([1, 2, 3], max_new_tokens=10 * BLOCK + 1, mode="ar",
                                                  **params).tokens


def test_max_new_tokens_is_exact_even_mid_block(always_right):
    for limit in (1, 2, BLOCK - 1, BLOCK, BLOCK + 3):
        assert len(always_right.generate([4], max_new_tokens=limit).tokens) == limit


@pytest.mark.parametrize("mode", ["ar", "orthrus"])
@pytest.mark.parametrize("params", [dict(), dict(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
def test_reading_ahead_emits_the_same_tokens(tiny_orthrus, always_right, monkeypatch, mode, params):
    """Iteration i + 1 enqueued before iteration i is read (the CUDA default) changes no token, wherever
    max_new_tokens cuts a block; always_right accepts whole blocks, so the capacity bound is exercised
    with a cache sized exactly to prompt + max_new_tokens + block."""
    cases = [(tiny_orthrus, [5, 6, 7], limit) for limit in (1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 70)]
    # Whole blocks reach 3 * BLOCK + 1 tokens with the last iteration unread: one more iteration enqueued
    # then would write past the capacity.
    limit = 3 * BLOCK + 3
    prompt = [1 + i % 300 for i in range(1024 - limit - BLOCK)]
    cases.append((always_right, prompt, limit))  # capacity: exactly 1024
    for model, prompt, limit in cases:
        results = []
        for read_ahead in (False, True):
            monkeypatch.setattr(model, "_read_ahead", read_ahead)
            results.append(model.generate(prompt, max_new_tokens=limit, mode=mode, **params))
        assert results[1].tokens == results[0].tokens
        assert results[1].stats["accepted_histogram"] == results[0].stats["accepted_histogram"]
    assert always_right._cache.capacity == 1024


def test_reading_ahead_runs_one_iteration_past_a_stop(text_model, monkeypatch):
    """The iteration enqueued ahead of the one that stops is discarded: its tokens are never read."""
    readbacks = []
    original = IterationRunner.readback
    monkeypatch.setattr(IterationRunner, "readback", lambda runner: readbacks.append(1) or original(runner))
    monkeypatch.setattr(text_model, "_read_ahead", True)
    full = text_model.generate("hello world", max_new_tokens=60, mode="orthrus", temperature=1.0, seed=2)
    stop = full.text[20:23]
    readbacks.clear()
    result = text_model.generate("hello world", max_new_tokens=60, mode="orthrus", temperature=1.0, seed=2,
                                 stop=stop)
    assert result.tokens == full.tokens[:len(result.tokens)] and len(result.tokens) < len(full.tokens)
    assert len(readbacks) == result.stats["iterations"] + 1


def test_one_runner_serves_every_seed(tmp_path):
    """Runners (CUDA graphs) are kept per sampling parameters without the seed, which they read from the
    device: a new seed reuses them and still samples exactly what a fresh model samples with it."""
    directory = write_checkpoint(tmp_path)
    model, fresh = orthrus.load(directory, device="cpu"), orthrus.load(directory, device="cpu")
    for mode in ("ar", "orthrus"):
        for seed in (5, 6, 5):
            reused = model.generate([3, 1, 4], max_new_tokens=30, mode=mode, temperature=1.0, seed=seed)
            fresh._runners.clear()
            assert reused.tokens == fresh.generate([3, 1, 4], max_new_tokens=30, mode=mode, temperature=1.0,
                                                   seed=seed).tokens
        model.generate([3, 1, 4], max_new_tokens=5, mode=mode)  # greedy, a random seed each call
        model.generate([3, 1, 4], max_new_tokens=5, mode=mode)
        assert sorted(params.temperature for m, params in model._runners if m == mode) == [0.0, 1.0]
    seeds = [model.generate([3, 1, 4], max_new_tokens=30, mode="orthrus", temperature=1.0, seed=s).tokens
             for s in (5, 6)]
    assert seeds[0] != seeds[1]


def test_eos_stops_generation_and_is_kept(tmp_path):
    weights = random_weights(TINY_CONFIG, orthrus=True, seed=1)
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])  # always emits token 0
    model = orthrus.load(write_checkpoint(tmp_path, weights=weights, eos_token_id=0), device="cpu")
    for mode in ("ar", "orthrus"):
        assert model.generate([7, 8], max_new_tokens=50, mode=mode).tokens == [0]


def test_diffusion_pass_never_writes_the_cache(tiny_orthrus):
    network, config = tiny_orthrus.network, tiny_orthrus.config
    network.reserve_positions(64)
    cache = KVCache(config, 64, BLOCK, network.device, network.dtype)
    params = SamplingParams.create()
    with torch.inference_mode():
        anchor = prefill(network, cache, torch.tensor([3, 1, 4, 1, 5]), params)
        k, v, length = cache.k.clone(), cache.v.clone(), cache.length.clone()
        drafts = diffusion_drafts(network, cache, anchor, params)
    assert drafts.shape == (BLOCK - 1,)
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and torch.equal(cache.length, length)


def test_iteration_rolls_back_to_the_accepted_length(tiny_orthrus):
    network, config = tiny_orthrus.network, tiny_orthrus.config
    network.reserve_positions(64)
    cache = KVCache(config, 64, BLOCK, network.device, network.dtype)
    params = SamplingParams.create()
    with torch.inference_mode():
        first = prefill(network, cache, torch.tensor([9, 9, 8]), params)
        runner = IterationRunner(network, cache, params, drafts=BLOCK - 1, diffusion=True)
        runner.anchor.copy_(first)
        for _ in range(4):
            before = int(cache.length)
            runner.step()
            count = int(runner.outputs.count)
            assert 1 <= count <= BLOCK
            # Only the anchor and the accepted drafts stay: the rejected tail is gone in O(1).
            assert int(cache.length) == before + count
            assert int(runner.anchor) == int(runner.outputs.tokens[count - 1])


def test_rollback_then_rewrite_equals_fresh_run(tiny_orthrus):
    """Rejected drafts leave stale K/V past the cache length; they must never influence later tokens."""
    prompt = [11, 12, 13, 14]
    fresh = tiny_orthrus.generate(prompt, max_new_tokens=40, mode="ar").tokens
    tiny_orthrus._cache.k.normal_()  # garbage everywhere, as stale rows would be
    tiny_orthrus._cache.v.normal_()
    assert tiny_orthrus.generate(prompt, max_new_tokens=40, mode="orthrus").tokens == fresh


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text_model")
    write_checkpoint(directory, seed=5)
    write_tokenizer(directory)
    return orthrus.load(directory, device="cpu")


@pytest.mark.parametrize("mode", ["ar", "orthrus"])
def test_stop_string_cuts_text_and_stream_never_shows_it(text_model, mode):
    full = text_model.generate("hello world", max_new_tokens=60, mode="ar", temperature=1.0, seed=2)
    stop = full.text[20:23]
    assert len(stop) == 3 and full.text.find(stop) == 20 or pytest.skip("need a stop string found first at 20")
    pieces = []
    result = text_model.generate("hello world", max_new_tokens=60, mode=mode, temperature=1.0, seed=2,
                                 stop=[stop, "never appears \x00"], stream=pieces.append)
    assert result.text == full.text[:20]
    assert "".join(pieces) == result.text
    assert result.tokens == full.tokens[:len(result.tokens)]
    assert len(result.tokens) < len(full.tokens)


def test_stream_concatenates_to_text_and_stats_are_complete(text_model):
    pieces = []
    result = text_model.generate("the quick brown", max_new_tokens=50, mode="orthrus", stream=pieces.append)
    assert "".join(pieces) == result.text == text_model.tokenizer.decode(result.tokens)
    stats = result.stats
    for key in ("iterations", "tokens_per_iteration", "tokens_per_second", "prefill_seconds", "decode_seconds",
                "accepted_histogram"):
        assert key in stats
    assert sum(k * n for k, n in stats["accepted_histogram"].items()) >= len(result.tokens) - 1
    assert stats["iterations"] == sum(stats["accepted_histogram"].values())


def test_chat_messages_use_the_template(text_model):
    messages = [{"role": "user", "content": "hi"}]
    ids = text_model.encode_prompt(messages)
    assert text_model.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert text_model.generate(messages, max_new_tokens=5).tokens == text_model.generate(ids, max_new_tokens=5).tokens


def test_plain_qwen3_generates_ar_and_ngram_but_not_orthrus(tmp_path):
    model = orthrus.load(write_checkpoint(tmp_path, orthrus=False), device="cpu")
    ar = model.generate([1, 2, 3] * 5, max_new_tokens=20, mode="ar")
    assert model.generate([1, 2, 3] * 5, max_new_tokens=20, mode="ngram").tokens == ar.tokens
    with pytest.raises(orthrus.OrthrusError, match="orthrus train"):
        model.generate([1, 2, 3], mode="orthrus")


def test_enable_thinking_reaches_the_chat_template(tmp_path):
    import json

    write_checkpoint(tmp_path)
    write_tokenizer(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ("{{ messages[0]['content'] }}"
                               "{% if enable_thinking is defined and not enable_thinking %} no-think{% endif %}")
    config_path.write_text(json.dumps(config))
    model = orthrus.load(tmp_path, device="cpu")
    messages = [{"role": "user", "content": "hi"}]
    assert model.tokenizer.decode(model.encode_prompt(messages)) == "hi"
    assert model.tokenizer.decode(model.encode_prompt(messages, enable_thinking=False)) == "hi no-think"
    thinking_off = model.generate(messages, max_new_tokens=4, enable_thinking=False)
    assert thinking_off.tokens == model.generate(model.encode_prompt(messages, False), max_new_tokens=4).tokens


def test_growing_the_rope_table_keeps_old_tables_and_bounds_them(tiny_orthrus):
    """Graphs captured earlier read the old RoPE table by address, so growing keeps it alive; growth is at
    least twofold, so everything kept alive stays smaller than the current table."""
    shared = tiny_orthrus.network  # a fresh network on its weights: its table starts empty
    network = Qwen3(shared.config, shared.embed, shared.layers, shared.final_norm, shared.lm_head)
    first = None
    for positions in range(64, 1025, 64):
        network.reserve_positions(positions)
        first = network.rope_cos_sin if first is None else first
        assert network.rope_cos_sin.shape[0] >= positions
    assert any(table is first for table in network._superseded_rope_tables)
    kept = sum(table.shape[0] for table in network._superseded_rope_tables)
    assert kept < network.rope_cos_sin.shape[0]
