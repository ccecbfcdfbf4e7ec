"""Seeded sampling that is a pure function of (logits row, seed, absolute position).

Each token is argmax(filtered logits / temperature + Gumbel noise), and the noise comes from a
counter-based hash of (seed, position, token id) instead of a stateful generator. AR decoding, the verify
pass and the drafter therefore draw the *same* noise for a position: Orthrus reproduces AR sampling for a
seed token for token, and the sampled distribution is exactly softmax(filtered logits / temperature).
Every operation here works row by row, so a row's token never depends on the other rows of its block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import OrthrusError

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, temperature=0.0, top_k=0, top_p=1.0, seed=None) -> "SamplingParams":
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise OrthrusError(f"temperature must be a number >= 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise OrthrusError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise OrthrusError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise OrthrusError(f"seed must be an integer >= 0, got {seed!r}")
        return cls(float(temperature), top_k, float(top_p), seed & _MASK32)


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds) of a Python int or an int64 tensor holding values
    < 2**32; tensor products wrap in int64 but their low 32 bits, the only ones kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The hash of a seed that every row's noise key starts from. Mixed on the host: a captured CUDA graph
    reads it from a device tensor that is filled before replays, so that one graph serves every seed."""
    return _mix32(seed)


def gumbel_noise(key: int | torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 [rows, vocab]: standard Gumbel noise keyed by (seed, position, token id); `key` is the seed's
    seed_key, an int or a one-element int64 tensor on the positions' device."""
    token_ids = torch.arange(vocab_size, device=positions.device, dtype=torch.int64)
    row_keys = _mix32((positions.to(torch.int64) & _MASK32) ^ key)
    bits = _mix32(row_keys[:, None] ^ _mix32((token_ids + 0x9E3779B9) & _MASK32)[None, :])
    # 24 random bits -> uniform in (0, 1), never 0 or 1, so both logs stay finite.
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 logits / temperature with everything outside top-k and the top-p nucleus set to -inf."""
    scores = logits.float() / params.temperature
    top_k = params.top_k if 0 < params.top_k < scores.shape[-1] else 0
    if top_k:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        # One row at a time: a batched sort/cumsum may pick different reduction paths for different row
        # counts, and a single flipped bit at the nucleus edge would change the sampled token.
        scores = torch.stack([_top_p_row(row, params.top_p, top_k) for row in scores])
    return scores


def _top_p_row(scores: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """The nucleus: tokens in descending order while the mass strictly before them is under top_p (so the
    first always stays), extended to every token tied with the last one kept."""
    # After top-k only the k largest scores have probability > 0, so only they need sorting.
    sorted_scores = torch.topk(scores, top_k).values if top_k else torch.sort(scores, descending=True).values
    probabilities = torch.softmax(sorted_scores, dim=-1)
    before = torch.cumsum(probabilities, dim=-1) - probabilities
    kept = (before < top_p).sum(dim=-1, keepdim=True)
    # Static shapes only (no boolean indexing): the step must stay capturable in a CUDA graph.
    threshold = sorted_scores.gather(0, kept - 1)
    return scores.masked_fill(scores < threshold, float("-inf"))


def sample(logits: torch.Tensor, positions: torch.Tensor | None, params: SamplingParams,
           key: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [rows]: the token drawn for each logits row; row i is the token at `positions[i]` (unused, and
    may be None, for greedy decoding). `key`: a device tensor holding the seed_key to sample with (what a
    captured graph reads); by default params.seed's."""
    if params.greedy:
        return logits.argmax(dim=-1)
    key = seed_key(params.seed) if key is None else key
    if logits.device.type == "cpu":
        # CPU elementwise kernels switch between vector and scalar code at offsets that depend on the
        # tensor's size; one row at a time makes each row's arithmetic that of a 1-row call.
        return torch.cat([_sample_block(logits[i:i + 1], positions[i:i + 1], params, key)
                          for i in range(logits.shape[0])])
    return _sample_block(logits, positions, params, key)


def _sample_block(logits: torch.Tensor, positions: torch.Tensor, params: SamplingParams,
                  key: int | torch.Tensor) -> torch.Tensor:
    scores = filter_logits(logits, params) + gumbel_noise(key, positions, logits.shape[-1])
    return scores.argmax(dim=-1)
