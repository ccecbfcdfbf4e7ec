"""Prompt-lookup drafting: the training-free baseline that the diffusion view is measured against.

The drafts are the tokens that followed the most recent earlier occurrence of the sequence's last n tokens
(longest n first). They go through the same exact verify pass as diffusion drafts, so the output is the
AR output either way; only the acceptance rate differs.
"""

from __future__ import annotations

import torch


class NGramDrafter:
    def __init__(self, max_drafts: int, max_ngram: int = 3):
        self.max_drafts = max_drafts
        self.max_ngram = max_ngram
        self._last_start: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ends
        self._indexed = 0  # history[:_indexed] has been indexed

    def _index(self, history: list[int]) -> None:
        # An n-gram is indexed once the token after it is known, so lookups only find continuations.
        for end in range(max(self._indexed, 1), len(history)):
            for n in range(1, self.max_ngram + 1):
                if end - n >= 0:
                    self._last_start[tuple(history[end - n:end])] = end
        self._indexed = max(self._indexed, len(history))

    def propose(self, history: list[int], device) -> torch.Tensor:
        """Up to max_drafts proposals for the tokens after `history` (int64, on `device`)."""
        self._index(history)
        drafts: list[int] = []
        for n in range(min(self.max_ngram, len(history)), 0, -1):
            start = self._last_start.get(tuple(history[-n:]))
            if start is not None:
                drafts = history[start:start + self.max_drafts]
                break
        return torch.tensor(drafts, dtype=torch.int64, device=device)
