"""Hugging Face transformers Qwen3ForCausalLM on the very tensors of our network, for the AR baseline.

The HF model is created on the meta device (no allocation, no initialisation) and its parameters are then
pointed at our tensors: the fused qkv and gate_up matrices are split into row blocks, which are views, so
the baseline costs no extra weight memory and runs on bit-identical weights.
"""

from __future__ import annotations

import gc

import torch

from orthrus.model import Qwen3

from .timing import Clock, median


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def build_hf_model(network: Qwen3):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = network.config
    hf_config = Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False, use_sliding_window=False, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        dtype=network.dtype)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(hf_config)

    def assign(module: torch.nn.Module, tensor: torch.Tensor) -> None:
        if tuple(module.weight.shape) != tuple(tensor.shape):
            raise RuntimeError(f"HF weight mapping: {type(module).__name__} expects {tuple(module.weight.shape)}, "
                               f"got {tuple(tensor.shape)}")
        module.weight = torch.nn.Parameter(tensor, requires_grad=False)

    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    assign(model.model.embed_tokens, network.embed)
    for hf_layer, layer in zip(model.model.layers, network.layers):
        attention, mlp = hf_layer.self_attn, hf_layer.mlp
        q, k, v = layer.ar.qkv.split([q_size, kv_size, kv_size])
        for module, tensor in ((attention.q_proj, q), (attention.k_proj, k), (attention.v_proj, v),
                               (attention.o_proj, layer.ar.o), (attention.q_norm, layer.ar.q_norm),
                               (attention.k_norm, layer.ar.k_norm)):
            assign(module, tensor)
        gate, up = layer.gate_up.chunk(2)
        assign(mlp.gate_proj, gate)
        assign(mlp.up_proj, up)
        assign(mlp.down_proj, layer.down)
        assign(hf_layer.input_layernorm, layer.input_norm)
        assign(hf_layer.post_attention_layernorm, layer.post_attention_norm)
    assign(model.model.norm, network.final_norm)
    assign(model.lm_head, network.lm_head)
    # The rotary inverse frequencies are buffers computed at construction: rebuild them for real, in fp32.
    with torch.device("cpu"):
        rotary = Qwen3RotaryEmbedding(config=hf_config)
    model.model.rotary_emb = rotary.to(network.device)
    left_on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"HF weight mapping left tensors unassigned: {', '.join(left_on_meta[:5])}")
    return model.eval()


def time_generate(model, prompt: torch.Tensor, new_tokens: int, cache_implementation: str, warmup: int,
                  repeats: int) -> dict:
    """Median wall time of a greedy `generate` call (prefill of the prompt + new_tokens decode steps)."""
    clock = Clock(prompt.device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation=cache_implementation,
                  pad_token_id=0)
    times, output = [], None
    for call in range(warmup + repeats):
        start = clock.mark()
        output = model.generate(prompt[None], **kwargs)
        end = clock.mark()
        clock.synchronize()
        if call >= warmup:
            times.append(clock.ms(start, end))
    generated = output[0, prompt.shape[0]:].tolist()
    if len(generated) != new_tokens:
        raise RuntimeError(f"HF generate ({cache_implementation} cache) produced {len(generated)} tokens, "
                           f"expected {new_tokens}")
    ms = median(times)
    return {
        "cache": cache_implementation,
        "prompt_tokens": prompt.shape[0],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "ms_per_call": ms,
        "tokens_per_second": 1e3 * new_tokens / ms,
        # Static cache on CUDA: transformers compiles the decode step (torch.compile, CUDA graphs) itself.
        "auto_compiled": cache_implementation == "static" and prompt.device.type == "cuda",
        "tokens": generated,
    }


def forget_compiled() -> None:
    """Free what torch.compile kept for a deleted HF model (compiled code, CUDA graphs, graph pools)."""
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
