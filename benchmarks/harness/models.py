"""Random-weight Orthrus models at the exact Qwen3 shapes, built directly on the target device.

Timing does not depend on what the weights are, only on their shapes, dtype and placement, so the
benchmark builds them in place (no checkpoint round trip) from a seeded generator. The initialisation keeps
activations finite through every layer: matrices have std 1/sqrt(fan_in) so each projection roughly
preserves the RMS of its input, norm weights are near 1, and the embedding (also the tied lm_head) has std
0.02 so logits come out with a std near 1.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from orthrus.config import ModelConfig
from orthrus.model import AttentionWeights, LayerWeights, Qwen3

QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=40960,
                    rms_norm_eps=1e-6, block_size=32, mask_token_id=151669)

SHAPES = {
    "1.7B": dict(QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "4B": dict(QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # The --quick smoke model: same structure (GQA, untied head, a diffusion view), seconds on a CPU.
    "tiny": dict(vocab_size=512, head_dim=16, rope_theta=10_000.0, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, block_size=32, mask_token_id=511, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}

EMBEDDING_STD = 0.02


def model_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(SHAPES)}")
    return ModelConfig(model_type="orthrus", **SHAPES[name])


def build_network(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Qwen3:
    """An Orthrus network (AR view + diffusion view) with random weights, allocated on `device`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def matrix(rows: int, columns: int, std: float | None = None) -> torch.Tensor:
        tensor = torch.empty(rows, columns, device=device, dtype=dtype)
        return tensor.normal_(0.0, columns ** -0.5 if std is None else std, generator=generator)

    def norm(dim: int) -> torch.Tensor:
        return torch.empty(dim, device=device, dtype=dtype).uniform_(0.9, 1.1, generator=generator)

    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    def attention() -> AttentionWeights:
        return AttentionWeights(qkv=matrix(q_size + 2 * kv_size, hidden), o=matrix(hidden, q_size),
                                q_norm=norm(head_dim), k_norm=norm(head_dim))

    layers = [
        LayerWeights(input_norm=norm(hidden), post_attention_norm=norm(hidden),
                     gate_up=matrix(2 * config.intermediate_size, hidden),
                     down=matrix(hidden, config.intermediate_size),
                     ar=attention(), diffusion=attention())
        for _ in range(config.num_hidden_layers)
    ]
    embed = matrix(config.vocab_size, hidden, std=EMBEDDING_STD)
    lm_head = embed if config.tie_word_embeddings else matrix(config.vocab_size, hidden, std=EMBEDDING_STD)
    return Qwen3(config, embed, layers, norm(hidden), lm_head)


def with_block_size(network: Qwen3, block_size: int) -> Qwen3:
    """The same weights (shared, not copied) under a config that drafts block_size - 1 tokens."""
    config = replace(network.config, block_size=block_size)
    return Qwen3(config, network.embed, network.layers, network.final_norm, network.lm_head)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def attention_bytes(weights: AttentionWeights) -> int:
    return sum(tensor_bytes(t) for t in (weights.qkv, weights.o, weights.q_norm, weights.k_norm))


def streamed_weight_bytes(network: Qwen3, view: str) -> int:
    """Weight bytes one forward pass of `view` reads from device memory.

    The embedding lookup reads a few rows, so the table is left out; the lm_head GEMM reads all of it,
    so it counts even when it is the same tensor as the embedding (tied)."""
    total = tensor_bytes(network.final_norm) + tensor_bytes(network.lm_head)
    for layer in network.layers:
        total += sum(tensor_bytes(t) for t in (layer.input_norm, layer.post_attention_norm, layer.gate_up,
                                               layer.down))
        total += attention_bytes(layer.ar if view == "ar" else layer.diffusion)
    return total


def diffusion_view_bytes(network: Qwen3) -> int:
    """Weights that exist only for the diffusion view: every layer's *_diff attention tensors."""
    return sum(attention_bytes(layer.diffusion) for layer in network.layers)


def unique_weight_bytes(network: Qwen3) -> int:
    seen, total = set(), 0
    tensors = [network.embed, network.lm_head, network.final_norm]
    for layer in network.layers:
        tensors += [layer.input_norm, layer.post_attention_norm, layer.gate_up, layer.down]
        for view in (layer.ar, layer.diffusion):
            tensors += [view.qkv, view.o, view.q_norm, view.k_norm]
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor_bytes(tensor)
    return total


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one position over all layers: what a pass reads per cached token."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
