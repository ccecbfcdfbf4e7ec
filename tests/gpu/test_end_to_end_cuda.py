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
from orthrus.engine import Model  # noqa: E402

pytestmark = pytest.mark.gpu

PROMPTS = int(os.environ.get("ORTHRUS_E2E_PROMPTS", "200"))
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def model(ext):
    config = model_config("1.7B")
    network = build_network(config, torch.device("cuda"), torch.bfloat16, seed=random.randrange(1 << 30))
    # Half the layers draft with the AR attention weights: drafts are then right often enough that exactness
    # is exercised on long accepted runs, not only on one token per iteration.
    for layer in network.layers[::2]:
        layer.diffusion = layer.ar
    return Model(config, network, None, "random Qwen3-1.7B shape")


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95, seed=7),
                                    dict(temperature=1.1, top_k=40, seed=8)],
                         ids=["greedy", "top_p", "top_k"])
def test_orthrus_equals_ar_bf16(model, params):
    rng = random.Random()
    prompts = [[rng.randrange(151643) for _ in range(rng.choice([1, 7, 40, 64, 65, 200, 1000]))]
               for _ in range(PROMPTS)]
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
    print(f"{params}: {PROMPTS} prompts x {NEW_TOKENS} tokens, {len(mismatches)} mismatches, "
          f"tokens per iteration {tokens / max(iterations, 1):.2f}")
    assert not mismatches, f"(prompt, prompt length, first differing token): {mismatches[:10]}"
