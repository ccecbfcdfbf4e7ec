"""The promise: Orthrus (and n-gram) decoding returns exactly the tokens of AR decoding, bit for bit."""

import random

import pytest
import torch

import orthrus
from checkpoints import TINY_CONFIG, random_weights, write_checkpoint

PROMPTS = 50
NEW_TOKENS = 64


def random_prompts(count, seed):
    rng = random.Random(seed)
    # Lengths on both sides of the 64-row prefill threshold (PyTorch kernels above, extension below).
    return [[rng.randrange(TINY_CONFIG["vocab_size"]) for _ in range(rng.choice([1, 2, 5, 17, 63, 64, 65, 90]))]
            for _ in range(count)]


@pytest.fixture(scope="module")
def drafty_model(tmp_path_factory):
    """A tiny Orthrus model whose diffusion view equals its AR view, so drafts are often right and
    iterations accept several tokens: exactness is then tested on long accepted runs, not only on
    single tokens."""
    config = dict(TINY_CONFIG)
    weights = random_weights(config, orthrus=True, seed=3, std=0.3)
    for name in list(weights):
        if "_diff." in name:
            weights[name] = weights[name.replace("_diff.", ".")].clone()
    return orthrus.load(write_checkpoint(tmp_path_factory.mktemp("drafty"), weights=weights), device="cpu")


SAMPLING = [
    dict(temperature=0.0),
    dict(temperature=0.8, seed=11),
    dict(temperature=1.3, top_k=20, seed=12),
    dict(temperature=0.7, top_p=0.85, seed=13),
    dict(temperature=1.0, top_k=50, top_p=0.9, seed=14),
]


@pytest.mark.parametrize("params", SAMPLING, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("which", ["random", "drafty"])
def test_orthrus_equals_ar(params, which, tiny_orthrus, drafty_model):
    model = tiny_orthrus if which == "random" else drafty_model
    accepted = 0
    for i, prompt in enumerate(random_prompts(PROMPTS, seed=hash(which) % 1000)):
        ar = model.generate(prompt, max_new_tokens=NEW_TOKENS, mode="ar", **params)
        dual = model.generate(prompt, max_new_tokens=NEW_TOKENS, mode="orthrus", **params)
        assert dual.tokens == ar.tokens, f"prompt {i}: first difference at " \
            f"{next(j for j, (a, b) in enumerate(zip(ar.tokens, dual.tokens)) if a != b)}"
        accepted += dual.stats["generated_tokens"] - dual.stats["iterations"]
    if which == "drafty":
        assert accepted > PROMPTS * 5, "the drafty model should accept drafts often"


@pytest.mark.parametrize("params", SAMPLING[:2], ids=["greedy", "sampled"])
def test_ngram_equals_ar(params, drafty_model):
    for prompt in random_prompts(20, seed=5):
        prompt = prompt * 3  # repetition gives the n-gram drafter something to find
        ar = drafty_model.generate(prompt, max_new_tokens=48, mode="ar", **params)
        ngram = drafty_model.generate(prompt, max_new_tokens=48, mode="ngram", **params)
        assert ngram.tokens == ar.tokens


def test_same_seed_same_output_and_different_seed_differs(tiny_orthrus):
    prompt = [5, 6, 7]
    first = tiny_orthrus.generate(prompt, max_new_tokens=32, mode="orthrus", temperature=1.0, seed=99)
    again = tiny_orthrus.generate(prompt, max_new_tokens=32, mode="orthrus", temperature=1.0, seed=99)
    other = tiny_orthrus.generate(prompt, max_new_tokens=32, mode="orthrus", temperature=1.0, seed=100)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


def test_sampling_follows_the_softmax_distribution():
    """Position-keyed Gumbel-max sampling draws from softmax(logits / T): chi-square style check."""
    from orthrus.sampling import SamplingParams, sample

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    params = SamplingParams.create(temperature=0.7, seed=4)
    draws = torch.cat([sample(logits, torch.tensor([p]), params) for p in range(20000)])
    frequencies = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = torch.softmax(logits[0] / 0.7, dim=-1)
    assert (frequencies - expected).abs().max() < 0.015
