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
    """The device buffer an iteration's acceptance writes, `emitted` = [count, tokens...]: `tokens[:count]`
    are the emitted tokens. One buffer, so that the host reads an iteration with one copy."""

    def __init__(self, block_rows: int, device):
        self.emitted = torch.zeros(block_rows + 1, dtype=torch.int64, device=device)
        self.count = self.emitted[:1]
        self.tokens = self.emitted[1:]


def positions_after(cache: KVCache, rows: int, params: SamplingParams) -> torch.Tensor | None:
    """Absolute positions cache.length + 1 .. cache.length + rows: where row j's prediction lands. None for
    greedy decoding, which draws no noise (so a decode step spends no kernels on them)."""
    if params.greedy:
        return None
    offsets = torch.arange(1, rows + 1, device=cache.length.device, dtype=torch.int64)
    return cache.length.to(torch.int64) + offsets


def draw(model: Qwen3, hidden: torch.Tensor, positions: torch.Tensor | None, params: SamplingParams,
         key: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [rows]: the token each row of final hidden states draws, row i's landing at positions[i]. Greedy
    decoding takes the argmax straight out of the lm_head projection, with no logits written; sampling
    draws from the logits (sampling.sample, which also explains `key`)."""
    if params.greedy:
        return model.greedy_tokens(hidden)
    return sample(model.logits(hidden), positions, params, key)


def prefill(model: Qwen3, cache: KVCache, prompt: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Run the prompt through the AR view from position 0; returns the first generated token [1]."""
    cache.rollback(0)
    hidden = model.forward(prompt, cache, AR_VIEW)
    cache.rollback(prompt.shape[0])
    return draw(model, hidden[-1:], cache.length.to(torch.int64), params)


def diffusion_drafts(model: Qwen3, cache: KVCache, anchor: torch.Tensor, params: SamplingParams,
                     key: torch.Tensor | None = None) -> torch.Tensor:
    """block_size - 1 proposals from one diffusion pass over [anchor, MASK, ..., MASK]. `key`: see sample."""
    block_size = model.config.block_size
    block = torch.full((block_size,), model.config.mask_token_id, dtype=torch.int64, device=anchor.device)
    block[:1] = anchor
    hidden = model.forward(block, cache, DIFFUSION_VIEW)
    return draw(model, hidden[:-1], positions_after(cache, block_size - 1, params), params, key)


def verify_and_accept(model: Qwen3, cache: KVCache, anchor: torch.Tensor, drafts: torch.Tensor,
                      params: SamplingParams, outputs: IterationOutputs, key: torch.Tensor | None = None) -> None:
    """Verifies [anchor, drafts], writes `outputs` and replaces `anchor` with the next iteration's."""
    block = torch.cat([anchor, drafts]) if drafts.numel() else anchor
    hidden = model.forward(block, cache, AR_VIEW)
    targets = draw(model, hidden, positions_after(cache, block.shape[0], params), params, key)
    emitted = outputs.emitted[:targets.shape[0] + 1]  # n-gram blocks may be shorter than the buffer
    ops.accept(drafts, targets, cache.length, emitted, anchor)
