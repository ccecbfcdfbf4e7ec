"""End to end on the GPU: `orthrus` decoding == `ar` decoding bit for bit, in bf16, on a random-weight
model of Qwen3-1.7B shape, greedy and seeded sampling, through the CUDA kernels and CUDA graphs."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.harness.models import build_network, model_config  # noqa: E402
from orthrus.cache import KVCache  # noqa: E402
from orthrus.decode import prefill  # noqa: E402
from orthrus.engine import Model  # noqa: E402
from orthrus.model import Qwen3  # noqa: E402
from orthrus.runner import IterationRunner  # noqa: E402
from orthrus.sampling import SamplingParams  # noqa: E402
from test_attention_cuda import split_schedule_limit  # noqa: E402

pytestmark = pytest.mark.gpu

PROMPTS = int(os.environ.get("ORTHRUS_E2E_PROMPTS", "200"))
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def network(ext):
    network = build_network(model_config("1.7B"), torch.device("cuda"), torch.bfloat16,
                            seed=random.randrange(1 << 30))
    # Half the layers draft with the AR attention weights, so drafts are right more often than by chance.
    for layer in network.layers[::2]:
        layer.diffusion = layer.ar
    return network


def random_prompts(count):
    rng = random.Random()
    return [[rng.randrange(151643) for _ in range(rng.choice([1, 7, 40, 64, 65, 200, 1000]))]
            for _ in range(count)]


def check_orthrus_equals_ar(model, params, prompts=None):
    prompts = random_prompts(PROMPTS) if prompts is None else prompts
    mismatches, iterations, tokens = [], 0, 0
    for index, prompt in enumerate(prompts):
        ar = model.generate(prompt, max_new_tokens=NEW_TOKENS, mode="ar", **params)
        dual = model.generate(prompt, max_new_tokens=NEW_TOKENS, mode="orthrus", **params)
        if dual.tokens != ar.tokens:
            first = next((j for j, (a, b) in enumerate(zip(ar.tokens, dual.tokens)) if a != b),
                         min(len(ar.tokens), len(dual.tokens)))
            mismatches.append((index, len(prompt), first))
        iterations += dual.stats["iterations"]
        tokens += dual.stats["generated_tokens"] - 1
    print(f"{params}: {len(prompts)} prompts x {NEW_TOKENS} tokens, {len(mismatches)} mismatches, "
          f"tokens per iteration {tokens / max(iterations, 1):.2f}")
    assert not mismatches, f"(prompt, prompt length, first differing token): {mismatches[:10]}"


def test_greedy_orthrus_equals_ar_bf16(network):
    check_orthrus_equals_ar(Model(network.config, network, None, "random Qwen3-1.7B shape"), dict(temperature=0.0))


def flat_logits(network):
    return Qwen3(network.config, network.embed, network.layers, network.final_norm * 0.1, network.lm_head)


def test_sampled_orthrus_equals_ar_bf16(network):
    """Logits scaled down (final norm x 0.1) so that the shared Gumbel noise often puts the same token on
    top in both views: iterations then accept long runs, which is where a verify row that differed from
    the one-token AR step in any bit would show up as a different token."""
    check_orthrus_equals_ar(Model(network.config, flat_logits(network), None, "random Qwen3-1.7B shape, flat logits"),
                            dict(temperature=1.0, top_k=200, top_p=0.95, seed=random.randrange(1 << 20)))


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, top_k=200, seed=20261122)],
                        ids=["greedy", "sampled"])
def test_long_prompts_cross_attention_schedules(network, params):
    """Prompts ending just before the attention kernel switches from one CTA per key split to whole
    chunks: AR steps before the switch and verify blocks straddling it take different schedules for the
    same rows, so the generated tokens match only if both schedules give the same bits."""
    config = network.config
    switch = split_schedule_limit(1, config.num_attention_heads, config.num_key_value_heads)
    rng = random.Random()
    prompts = [[rng.randrange(151643) for _ in range(switch - rng.randint(1, NEW_TOKENS - 1))] for _ in range(4)]
    check_orthrus_equals_ar(Model(config, network, None, "random Qwen3-1.7B shape"), params, prompts)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_forced_full_acceptance_equals_ar(network, sampled):
    """Random weights draft badly, so the tests above accept about one token per iteration and only the
    first verify row decides a token. Here every iteration's drafts are the AR continuation itself: all
    block_size - 1 are accepted only if every row of the B-row verify pass (graph-replayed, as in
    decoding) gives the token the one-row AR step gave at that position."""
    if sampled:
        network = flat_logits(network)
        params = dict(temperature=1.0, top_k=200, top_p=0.95, seed=random.randrange(1 << 20))
    else:
        params = dict(temperature=0.0)
    model = Model(network.config, network, None, "random Qwen3-1.7B shape")
    block = network.config.block_size
    prompts = random_prompts(PROMPTS)
    capacity = max(map(len, prompts)) + NEW_TOKENS + 2 * block
    cache = KVCache(network.config, capacity, block, network.device, network.dtype)
    network.reserve_positions(capacity)
    sampling = SamplingParams.create(**params)
    runner = IterationRunner(network, cache, sampling, block - 1, diffusion=False)
    mismatches, checked = [], 0
    for index, prompt in enumerate(prompts):
        continuation = model.generate(prompt, max_new_tokens=NEW_TOKENS, mode="ar", **params).tokens
        runner.anchor.copy_(prefill(network, cache, torch.tensor(prompt, device=network.device), sampling))
        assert int(runner.anchor.item()) == continuation[0]
        for start in range(0, len(continuation) - block, block):
            runner.drafts.copy_(torch.tensor(continuation[start + 1:start + block], device=network.device))
            runner.verify()
            count = int(runner.outputs.count.item())
            emitted = runner.outputs.tokens[:count].tolist()
            checked += 1
            if emitted != continuation[start + 1:start + block + 1]:
                mismatches.append((index, len(prompt), start, count))
                break
    print(f"{params}: {len(prompts)} prompts, {checked} fully forced iterations of {block} tokens, "
          f"{len(mismatches)} mismatches")
    assert not mismatches, f"(prompt, prompt length, iteration start, tokens emitted): {mismatches[:10]}"


def test_captured_runners_serve_every_seed(network):
    """Runners (CUDA graphs) are kept per sampling parameters without the seed, which the graphs read from
    the device: a reused runner must sample, for each seed, what a freshly captured one samples, and
    Orthrus must still equal AR for each."""
    network = flat_logits(network)
    model = Model(network.config, network, None, "random Qwen3-1.7B shape, flat logits")
    prompts = random_prompts(8)
    mismatches = []
    for seed in (5, 6, 5, 7):
        params = dict(temperature=1.0, top_k=200, top_p=0.95, seed=seed)
        for index, prompt in enumerate(prompts):
            fresh = Model(network.config, network, None, "fresh runners")
            expected = fresh.generate(prompt, max_new_tokens=NEW_TOKENS, mode="orthrus", **params).tokens
            for mode in ("orthrus", "ar"):
                if model.generate(prompt, max_new_tokens=NEW_TOKENS, mode=mode, **params).tokens != expected:
                    mismatches.append((seed, index, mode))
    assert len(model._runners) == 2  # one per mode, for three seeds
    assert not mismatches, f"(seed, prompt, mode): {mismatches[:10]}"
