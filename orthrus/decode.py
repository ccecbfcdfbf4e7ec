"""Draft, verify, accept: one decoding iteration, with all state on the model's device.

An iteration at position p = cache.length feeds [anchor, drafts...] to the AR view, which stores their
keys and values at p.. and yields, for every row j, the token AR decoding emits at p + j + 1. The longest
prefix of drafts equal to those tokens is accepted, the AR token after it becomes the next anchor, and the
cache length moves to p + accepted + 1: the rejected tail is simply overwritten later. Plain AR decoding
is the same iteration with no drafts, which is why the two modes share every line that decides a token.
"""

from __future__ import annotations

import torch

from . import ops
from .cache import KVCache
from .model import AR_VIEW, DIFFUSION_VIEW, Qwen3
from .sampling import SamplingParams, sample


class IterationOutputs:
    """Device buffers one iteration writes: `tokens[:count]` are the emitted tokens, `next_anchor` the
    token the next iteration starts from (tokens[count - 1])."""

    def __init__(self, block_rows: int, device):
        self.tokens = torch.zeros(block_rows, dtype=torch.int64, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)
        self.next_anchor = torch.zeros(1, dtype=torch.int64, device=device)


def positions_after(cache: KVCache, rows: int, params: SamplingParams) -> torch.Tensor | None:
    """Absolute positions cache.length + 1 .. cache.length + rows: where row j's prediction lands. None for
    greedy decoding, which draws no noise (so a decode step spends no kernels on them)."""
    if params.greedy:
        return None
    offsets = torch.arange(1, rows + 1, device=cache.length.device, dtype=torch.int64)
    return cache.length.to(torch.int64) + offsets


def prefill(model: Qwen3, cache: KVCache, prompt: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Run the prompt through the AR view from position 0; returns the first generated token [1]."""
    cache.rollback(0)
    hidden = model.forward(prompt, cache, AR_VIEW)
    cache.rollback(prompt.shape[0])
    return sample(model.logits(hidden[-1:]), cache.length.to(torch.int64), params)


def diffusion_drafts(model: Qwen3, cache: KVCache, anchor: torch.Tensor, params: SamplingParams,
                     key: torch.Tensor | None = None) -> torch.Tensor:
    """block_size - 1 proposals from one diffusion pass over [anchor, MASK, ..., MASK]. `key`: see sample."""
    block_size = model.config.block_size
    block = torch.full((block_size,), model.config.mask_token_id, dtype=torch.int64, device=anchor.device)
    block[:1] = anchor
    hidden = model.forward(block, cache, DIFFUSION_VIEW)
    return sample(model.logits(hidden[:-1]), positions_after(cache, block_size - 1, params), params, key)


def verify_and_accept(model: Qwen3, cache: KVCache, anchor: torch.Tensor, drafts: torch.Tensor,
                      params: SamplingParams, outputs: IterationOutputs, key: torch.Tensor | None = None) -> None:
    block = torch.cat([anchor, drafts]) if drafts.numel() else anchor
    hidden = model.forward(block, cache, AR_VIEW)
    targets = sample(model.logits(hidden), positions_after(cache, block.shape[0], params), params, key)
    outputs.tokens[:targets.shape[0]] = targets
    ops.accept(drafts, targets, cache.length, outputs.count, outputs.next_anchor)
