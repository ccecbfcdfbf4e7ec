"""Qwen3 with Orthrus's two attention views, as plain tensors and one forward function.

The AR view is the frozen Qwen3. The diffusion view swaps in the `*_diff` attention weights of every
layer, attends the AR cache plus its own block bidirectionally, and never writes the cache. Everything
else (embeddings, norms, MLPs, lm_head) is shared by the two views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .cache import KVCache
from .config import ModelConfig

AR_VIEW = "ar"
DIFFUSION_VIEW = "diffusion"


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [(q_heads + 2 kv_heads) * head_dim, hidden]: q, k, v projections fused in one GEMM
    o: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows first, then up
    down: torch.Tensor
    ar: AttentionWeights
    diffusion: AttentionWeights | None


def rope_table(config: ModelConfig, positions: int, device) -> torch.Tensor:
    """float32 [positions, head_dim]: cos of position * inv_freq in the first half, sin in the second."""
    exponent = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponent)
    angles = torch.outer(torch.arange(positions, dtype=torch.int64).float(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


class Qwen3:
    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: torch.Tensor):
        self.config = config
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope_cos_sin = rope_table(config, 0, embed.device)
        self._superseded_rope_tables: list[torch.Tensor] = []
        self.scale = config.head_dim ** -0.5

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def has_diffusion_view(self) -> bool:
        return self.layers[0].diffusion is not None

    def reserve_positions(self, positions: int) -> None:
        """Grow the RoPE table to cover `positions` (allocation stays out of the decode loop)."""
        rows = self.rope_cos_sin.shape[0]
        if rows < positions:
            # CUDA graphs captured earlier by any runner of this network read the old table by address and
            # may still be replayed at the positions it covers: it is kept alive, not freed. Growing at least
            # twofold keeps all the tables kept alive smaller than the current one.
            self._superseded_rope_tables.append(self.rope_cos_sin)
            grown = max(positions, min(2 * rows, self.config.max_position_embeddings))
            self.rope_cos_sin = rope_table(self.config, grown, self.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache, view: str) -> torch.Tensor:
        """Final-norm hidden states [rows, hidden] of `tokens` placed at positions cache.length...

        The AR view stores its keys and values at those positions; the diffusion view leaves the cache as
        it was."""
        eps = self.config.rms_norm_eps
        # x: the residual stream, updated in place. h: the next projection's input, normalised already or,
        # with square_sums, the deferred norm of ops.linear_add_deferred_norm, which that projection finishes.
        x, h = ops.embedding_rms_norm(tokens, self.embed, self.layers[0].input_norm, eps)
        square_sums = None
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [None]
        for index, (layer, next_norm) in enumerate(zip(self.layers, next_norms)):
            weights = layer.ar if view == AR_VIEW else layer.diffusion
            attention = self.attention(h, square_sums, weights, index, cache, view)
            h, square_sums = ops.linear_add_deferred_norm(attention, weights.o, x, layer.post_attention_norm, eps)
            activation = ops.linear_silu_mul(h, layer.gate_up, square_sums, eps)
            if next_norm is not None:
                h, square_sums = ops.linear_add_deferred_norm(activation, layer.down, x, next_norm, eps)
        # The final norm's output is the result, so it is applied here rather than deferred.
        return ops.add_rms_norm(x, ops.linear(activation, self.layers[-1].down), self.final_norm, eps)

    def attention(self, h: torch.Tensor, square_sums: torch.Tensor | None, weights: AttentionWeights, index: int,
                  cache: KVCache, view: str) -> torch.Tensor:
        """The attention heads' output [rows, q_heads * head_dim], before the output projection."""
        config, rows = self.config, h.shape[0]
        if view == AR_VIEW:
            k_dst, v_dst, dst_start = cache.k[index], cache.v[index], cache.length
            k_block = v_block = None
        else:
            k_dst, v_dst, dst_start = cache.block_k, cache.block_v, cache.block_start
            k_block, v_block = cache.block_k[:rows], cache.block_v[:rows]
        q = ops.linear_qk_norm_rope_store(h, weights.qkv, weights.q_norm, weights.k_norm, self.rope_cos_sin,
                                          cache.length, k_dst, v_dst, dst_start, config.rms_norm_eps, square_sums)
        out = ops.attention(q, cache.k[index], cache.v[index], cache.length, k_block, v_block,
                            causal=view == AR_VIEW, scale=self.scale)
        return out.reshape(rows, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.linear(hidden, self.lm_head)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """logits(hidden).argmax(-1), without writing the logits."""
        return ops.linear_argmax(hidden, self.lm_head)
