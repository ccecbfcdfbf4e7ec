"""Top-k / top-p filtering: which tokens stay, and that a row's result never depends on its batch."""

import math

import pytest
import torch

from orthrus.sampling import SamplingParams, filter_logits, sample

NEG_INF = float("-inf")


def kept(logits, **params):
    scores = filter_logits(torch.tensor([logits]).log(), SamplingParams.create(temperature=1.0, **params))
    return [i for i, value in enumerate(scores[0].tolist()) if value != NEG_INF]


def test_top_p_keeps_tokens_until_the_mass_before_them_reaches_top_p():
    probabilities = [0.5, 0.3, 0.15, 0.05]
    assert kept(probabilities, top_p=0.5) == [0]
    assert kept(probabilities, top_p=0.7) == [0, 1]
    assert kept(probabilities, top_p=0.85) == [0, 1, 2]
    assert kept(probabilities, top_p=1.0) == [0, 1, 2, 3]
    assert kept([0.05, 0.15, 0.3, 0.5], top_p=0.7) == [2, 3]


def test_top_p_applies_to_the_renormalised_top_k():
    # Over all four the mass before the third token is 0.8; over the top 3 it is 0.84.
    assert kept([0.5, 0.3, 0.15, 0.05], top_p=0.82) == [0, 1, 2]
    assert kept([0.5, 0.3, 0.15, 0.05], top_k=3, top_p=0.82) == [0, 1]
    assert kept([0.5, 0.3, 0.15, 0.05], top_k=2, top_p=0.99) == [0, 1]


def test_tokens_tied_with_the_last_kept_one_stay():
    assert kept([0.4, 0.4, 0.2], top_p=0.3) == [0, 1]
    assert kept([0.25, 0.25, 0.25, 0.25], top_k=2, top_p=0.1) == [0, 1, 2, 3]


@pytest.mark.parametrize("params", [dict(top_p=0.9), dict(top_k=20, top_p=0.8), dict(top_k=5)])
def test_rows_are_filtered_and_sampled_independently(params):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 500, generator=generator) * 3
    sampling = SamplingParams.create(temperature=0.8, seed=3, **params)
    batch = filter_logits(logits, sampling)
    positions = torch.arange(100, 109)
    tokens = sample(logits, positions, sampling)
    for row in range(9):
        assert torch.equal(filter_logits(logits[row:row + 1], sampling)[0], batch[row])
        assert sample(logits[row:row + 1], positions[row:row + 1], sampling).item() == tokens[row].item()
    assert not math.isinf(batch.max(dim=-1).values.min().item())
