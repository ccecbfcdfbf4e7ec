"""Tiny random Qwen3 / Orthrus checkpoints in Hugging Face layout, written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "orthrus",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "eos_token_id": 383,
    "block_size": 8,
    "mask_token_id": 382,
    "torch_dtype": "float32",
}

DIFF_NAMES = ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff", "k_norm_diff")


def random_weights(config: dict, orthrus: bool, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=generator) * std

    def norm(size):
        return 1.0 + 0.1 * torch.randn(size, generator=generator)

    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    weights = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=generator),
               "model.norm.weight": norm(hidden)}
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = matrix(config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm(hidden)
        weights[p + "post_attention_layernorm.weight"] = norm(hidden)
        weights[p + "mlp.gate_proj.weight"] = matrix(config["intermediate_size"], hidden)
        weights[p + "mlp.up_proj.weight"] = matrix(config["intermediate_size"], hidden)
        weights[p + "mlp.down_proj.weight"] = matrix(hidden, config["intermediate_size"])
        for suffix in ("", "_diff") if orthrus else ("",):
            weights[p + f"self_attn.q_proj{suffix}.weight"] = matrix(q_size, hidden)
            weights[p + f"self_attn.k_proj{suffix}.weight"] = matrix(kv_size, hidden)
            weights[p + f"self_attn.v_proj{suffix}.weight"] = matrix(kv_size, hidden)
            weights[p + f"self_attn.o_proj{suffix}.weight"] = matrix(hidden, q_size)
            weights[p + f"self_attn.q_norm{suffix}.weight"] = norm(head_dim)
            weights[p + f"self_attn.k_norm{suffix}.weight"] = norm(head_dim)
    return weights


def write_checkpoint(directory, *, orthrus: bool = True, tied: bool = False, shards: int = 1, seed: int = 0,
                     dtype=torch.float32, weights: dict | None = None, **overrides) -> Path:
    """Writes config.json and model.safetensors (or `shards` shards plus the index) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG, tie_word_embeddings=tied, **overrides)
    if not orthrus:
        config["model_type"] = "qwen3"
        del config["block_size"], config["mask_token_id"]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = weights if weights is not None else random_weights(config, orthrus, seed)
    weights = {name: tensor.to(dtype).contiguous() for name, tensor in weights.items()}
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(weights)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: weights[name] for name in names[shard::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_tokenizer(directory, vocab_size: int = TINY_CONFIG["vocab_size"]) -> Path:
    """A byte-level BPE trained on a little text, with <|endoftext|> as the last id (the tiny EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [Path(__file__).read_text()] * 4 + ["hello world, the quick brown fox jumps over the lazy dog"] * 8
    tokenizer.train_from_iterator(corpus, trainer)
    while tokenizer.get_vocab_size() < vocab_size - 2:  # pad so that the special ids land where config says
        tokenizer.add_tokens([f"<|pad{tokenizer.get_vocab_size()}|>"])
    tokenizer.add_special_tokens(["<|mask|>", "<|endoftext|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "chat_template": template}))
    return directory
