"""The static KV cache: preallocated once, written in place, rolled back by a length update."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """AR-view keys and values of one sequence, [layers, capacity, kv_heads, head_dim] each.

    `length` lives on the model's device so that a captured CUDA graph reads and advances it without a
    host round trip; rows at and past `length` are scratch that the next verify pass overwrites, which is
    why rolling back rejected drafts costs nothing. The diffusion view never writes here: its block keys
    and values go to `block_k` / `block_v`, one block of scratch shared by all layers.
    """

    def __init__(self, config: ModelConfig, capacity: int, block_rows: int, device, dtype):
        shape = (config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        block_shape = (block_rows, config.num_key_value_heads, config.head_dim)
        self.block_k = torch.zeros(block_shape, device=device, dtype=dtype)
        self.block_v = torch.zeros(block_shape, device=device, dtype=dtype)
        self.length = torch.zeros(1, device=device, dtype=torch.int32)
        self.block_start = torch.zeros(1, device=device, dtype=torch.int32)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def block_rows(self) -> int:
        return self.block_k.shape[0]

    def rollback(self, length: int) -> None:
        """Forget every position at and after `length`."""
        self.length.fill_(length)
