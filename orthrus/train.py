"""`orthrus train`: give a frozen Qwen3 its diffusion view.

The base model stays frozen; only the per-layer `*_diff` attention weights are trained, starting from a
copy of the AR attention weights. One packed training sequence carries many anchor blocks: block i is the
sequence's token at anchor a_i followed by block_size - 1 mask tokens at positions a_i + 1.., and it
attends the clean AR keys/values of positions [0, a_i) plus its own block bidirectionally, exactly as a
diffusion pass does at inference. All blocks of a sequence share one masked attention over
[AR keys of the sequence ; diffusion keys of every block]. Row j of a block is trained to match the frozen
AR model's next-token distribution at position a_i + j on the clean sequence (forward KL, teacher -> student).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import OrthrusError
from .loader import CheckpointTensors, expected_shapes, resolve_checkpoint
from .model import rope_table
from .ops import reference_rms_norm, reference_rope
from .tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
SELF_DISTILL_FILE = "self_distill.pt"
MASK_TOKEN = "<|mask|>"
# Copied next to the weights so that the output is a complete checkpoint (the loader reads the first two).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
DIFFUSION_SUFFIXES = ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff", "k_norm_diff")
LOSS_CHUNK_ELEMENTS = 1 << 26  # logits per chunk of the loss: bounds its memory at large vocabularies
EVAL_PROMPT_TOKENS = 64
SPEED_WARMUP_STEPS = 3  # steps left out of tokens/s (compilation, allocator warm-up)
CALIBRATION_STEPS = 10  # timed steps before --max-minutes fixes the step count


# ---------------------------------------------------------------------------------------------------------
# The two-view Qwen3 as a differentiable module (the engine's Qwen3 is inference-only, on custom kernels).

class ViewAttention(nn.Module):
    """One view's attention weights; q, k and v projections fused as in the engine."""

    def __init__(self, qkv: torch.Tensor, o: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor):
        super().__init__()
        self.qkv, self.o = nn.Parameter(qkv), nn.Parameter(o)
        self.q_norm, self.k_norm = nn.Parameter(q_norm), nn.Parameter(k_norm)


class Layer(nn.Module):
    def __init__(self, tensors: dict, prefix: str, with_diffusion: bool):
        super().__init__()
        self.input_norm = nn.Parameter(tensors[prefix + "input_layernorm.weight"])
        self.post_attention_norm = nn.Parameter(tensors[prefix + "post_attention_layernorm.weight"])
        self.gate_up = nn.Parameter(torch.cat([tensors[prefix + "mlp.gate_proj.weight"],
                                               tensors[prefix + "mlp.up_proj.weight"]]))
        self.down = nn.Parameter(tensors[prefix + "mlp.down_proj.weight"])

        def view(suffix: str) -> ViewAttention:
            def get(name):
                return tensors[f"{prefix}self_attn.{name}{suffix}.weight"]
            return ViewAttention(torch.cat([get("q_proj"), get("k_proj"), get("v_proj")]), get("o_proj"),
                                 get("q_norm"), get("k_norm"))

        self.ar = view("")
        self.diffusion = view("_diff") if with_diffusion else None


class TrainableQwen3(nn.Module):
    """Qwen3 with an optional diffusion view, batched: tokens are [batch, rows]."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], with_diffusion: bool):
        super().__init__()
        self.config = config
        if with_diffusion and "model.layers.0.self_attn.q_proj_diff.weight" not in tensors:
            tensors = dict(tensors)
            for i in range(config.num_hidden_layers):  # the diffusion view starts as a copy of the AR view
                for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                    source = tensors[f"model.layers.{i}.self_attn.{name}.weight"]
                    tensors[f"model.layers.{i}.self_attn.{name}_diff.weight"] = source.detach().clone()
        self.embed = nn.Parameter(tensors["model.embed_tokens.weight"])
        self.layers = nn.ModuleList(Layer(tensors, f"model.layers.{i}.", with_diffusion)
                                    for i in range(config.num_hidden_layers))
        self.final_norm = nn.Parameter(tensors["model.norm.weight"])
        self.lm_head = None if config.tie_word_embeddings else nn.Parameter(tensors["lm_head.weight"])
        self.register_buffer("rope", rope_table(config, 0, self.embed.device), persistent=False)
        self.scale = config.head_dim ** -0.5

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def reserve_positions(self, positions: int) -> None:
        if self.rope.shape[0] < positions:
            self.rope = rope_table(self.config, positions, self.embed.device)

    def diffusion_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.diffusion.parameters()]

    def _project(self, h, weights: ViewAttention, positions):
        """Normed and rotated q, k and plain v, each [batch, rows, heads, head_dim]."""
        config = self.config
        batch, rows = h.shape[:2]
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        q, k, v = F.linear(h, weights.qkv).split([q_size, kv_size, kv_size], dim=-1)
        cos_sin = self.rope[positions].expand(batch, rows, -1).reshape(batch * rows, -1)

        def norm_rope(x, weight):
            heads = x.shape[-1] // config.head_dim
            x = reference_rms_norm(x.reshape(batch * rows, heads, config.head_dim), weight, config.rms_norm_eps)
            return reference_rope(x, cos_sin).view(batch, rows, heads, config.head_dim)

        return norm_rope(q, weights.q_norm), norm_rope(k, weights.k_norm), \
            v.view(batch, rows, -1, config.head_dim)

    def _mlp(self, x, layer: Layer):
        gate, up = F.linear(reference_rms_norm(x, layer.post_attention_norm, self.config.rms_norm_eps),
                            layer.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down)

    def ar_forward(self, tokens: torch.Tensor, cache: list | None = None, start: int = 0):
        """Final-normed hidden states [batch, rows, hidden] and each layer's (k, v) [batch, rows, kv, d].

        With `cache` (per layer (k, v) buffers [batch, capacity, kv, d]) the rows sit at positions
        start.. after the cached ones: either a causal prompt from position 0 or a single new row."""
        rows = tokens.shape[1]
        if cache is not None and start > 0 and rows > 1:
            raise ValueError("ar_forward with a cache takes a prompt at position 0 or one row at a time")
        positions = torch.arange(start, start + rows, device=tokens.device)
        x = self.embed[tokens]
        keys_values = []
        for index, layer in enumerate(self.layers):
            q, k, v = self._project(reference_rms_norm(x, layer.input_norm, self.config.rms_norm_eps),
                                    layer.ar, positions)
            keys_values.append((k, v))
            if cache is not None:
                cache[index][0][:, start:start + rows] = k
                cache[index][1][:, start:start + rows] = v
                k, v = cache[index][0][:, :start + rows], cache[index][1][:, :start + rows]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=rows > 1, scale=self.scale, enable_gqa=True)
            x = x + F.linear(out.transpose(1, 2).flatten(2), layer.ar.o)
            x = x + self._mlp(x, layer)
        return reference_rms_norm(x, self.final_norm, self.config.rms_norm_eps), keys_values

    def diffusion_forward(self, tokens, positions, ar_keys_values, attend):
        """Final-normed hidden states of the diffusion rows [batch, rows, hidden]; `attend(q, k, v)` is the
        masked attention over [AR keys ; diffusion keys] (q, k, v as [batch, heads, rows, d])."""
        x = self.embed[tokens]
        for layer, (ar_k, ar_v) in zip(self.layers, ar_keys_values):
            q, k, v = self._project(reference_rms_norm(x, layer.input_norm, self.config.rms_norm_eps),
                                    layer.diffusion, positions)
            keys, values = torch.cat([ar_k, k], dim=1), torch.cat([ar_v, v], dim=1)
            out = attend(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
            x = x + F.linear(out.transpose(1, 2).flatten(2), layer.diffusion.o)
            x = x + self._mlp(x, layer)
        return reference_rms_norm(x, self.final_norm, self.config.rms_norm_eps)

    def hf_tensors(self, diffusion_only: bool = False) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names (the names released Orthrus checkpoints use)."""
        config = self.config
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        out = {}
        if not diffusion_only:
            out["model.embed_tokens.weight"] = self.embed
            out["model.norm.weight"] = self.final_norm
            if self.lm_head is not None:
                out["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            views = [("_diff", layer.diffusion)] if layer.diffusion is not None else []
            if not diffusion_only:
                views.insert(0, ("", layer.ar))
                gate, up = layer.gate_up.chunk(2)
                out.update({prefix + "input_layernorm.weight": layer.input_norm,
                            prefix + "post_attention_layernorm.weight": layer.post_attention_norm,
                            prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
                            prefix + "mlp.down_proj.weight": layer.down})
            for suffix, view in views:
                q, k, v = view.qkv.split([q_size, kv_size, kv_size])
                for name, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", view.o),
                                     ("q_norm", view.q_norm), ("k_norm", view.k_norm)):
                    out[f"{prefix}self_attn.{name}{suffix}.weight"] = tensor
        return {name: tensor.detach() for name, tensor in out.items()}


# ---------------------------------------------------------------------------------------------------------
# The anchor-block attention and the distillation loss.

def anchor_block_mask(anchors: torch.Tensor, seq_len: int, block_size: int):
    """mask_mod(batch, head, query, key): diffusion row `query` (block query // block_size) sees AR key
    positions before its block's anchor and every diffusion key of its own block."""
    def visible(batch, head, query, key):
        block = query // block_size
        own_block = (key >= seq_len) & ((key - seq_len) // block_size == block)
        return (key < anchors[batch, block]) | own_block
    return visible


_compiled_flex_attention = None


def block_mask(anchors: torch.Tensor, seq_len: int, block_size: int):
    """The attention mask of one micro-batch: a block-sparse FlexAttention mask on CUDA, a dense boolean
    [batch, 1, rows, keys] one elsewhere (built from the same mask_mod, so both are the same attention)."""
    from torch.nn.attention import flex_attention as flex

    batch, blocks = anchors.shape
    rows, keys = blocks * block_size, seq_len + blocks * block_size
    mask_mod = anchor_block_mask(anchors, seq_len, block_size)
    if anchors.device.type == "cuda":
        global _compiled_flex_attention
        if _compiled_flex_attention is None:  # uncompiled FlexAttention is a slow reference implementation
            _compiled_flex_attention = torch.compile(flex.flex_attention, dynamic=False)
        return flex.create_block_mask(mask_mod, B=batch, H=None, Q_LEN=rows, KV_LEN=keys,
                                      device=anchors.device, _compile=True)
    # The mask_mod is elementwise, so broadcast index grids evaluate it at once (flex's create_mask vmaps
    # it, which is far slower).
    device = anchors.device
    return mask_mod(torch.arange(batch, device=device)[:, None, None, None], None,
                    torch.arange(rows, device=device)[None, None, :, None],
                    torch.arange(keys, device=device)[None, None, None, :])


def masked_attention(q, k, v, mask, scale: float):
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return _compiled_flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)


def _chunk_kl(student: torch.Tensor, teacher: torch.Tensor, output_weight: torch.Tensor,
              row_weights: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        teacher_log_probs = F.log_softmax(F.linear(teacher, output_weight).float(), dim=-1)
    student_log_probs = F.log_softmax(F.linear(student, output_weight).float(), dim=-1)
    return (row_weights * (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)).sum()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, output_weight: torch.Tensor,
                      row_weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean forward KL(teacher || student) of the next-token distributions of matching rows
    [rows, hidden]; row_weights [rows].

    Logits are made chunk by chunk and recomputed in the backward pass, so a 150k vocabulary never holds
    the logits of every row at once."""
    rows = student.shape[0]
    chunk = max(1, LOSS_CHUNK_ELEMENTS // output_weight.shape[0])
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, chunk):
        part = (student[start:start + chunk], teacher[start:start + chunk], output_weight,
                row_weights[start:start + chunk])
        if rows > chunk:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_kl, *part, use_reentrant=False)
        else:
            total = total + _chunk_kl(*part)
    return total / row_weights.sum()


def sample_anchors(batch: int, seq_len: int, block_size: int, blocks: int, generator) -> torch.Tensor:
    """[batch, blocks] distinct sorted anchor positions in [1, seq_len - block_size]: every block lies inside
    the sequence and has at least one clean AR position before it, as at inference."""
    choices = seq_len - block_size
    anchors = torch.stack([torch.randperm(choices, generator=generator)[:blocks] for _ in range(batch)]) + 1
    return anchors.sort(dim=1).values


def diffusion_step_loss(model: TrainableQwen3, sequences: torch.Tensor, anchors: torch.Tensor, mask,
                        block_size: int, mask_token_id: int, row_weights: torch.Tensor) -> torch.Tensor:
    """The loss of one micro-batch: AR teacher pass without gradients, diffusion pass through autograd.
    Row j of every block weighs row_weights[j] (a tensor, so that changing it recompiles nothing)."""
    batch, seq_len = sequences.shape
    offsets = torch.arange(block_size, device=sequences.device)
    positions = (anchors[:, :, None] + offsets).flatten(1)  # [batch, blocks * block_size]
    with torch.no_grad():
        teacher_hidden, keys_values = model.ar_forward(sequences)
        teacher = teacher_hidden.gather(1, positions[..., None].expand(-1, -1, teacher_hidden.shape[-1]))
    block_tokens = torch.full_like(positions, mask_token_id)
    block_tokens[:, ::block_size] = sequences.gather(1, anchors)
    student = model.diffusion_forward(block_tokens, positions, keys_values,
                                      lambda q, k, v: masked_attention(q, k, v, mask, model.scale))
    return distillation_loss(student.flatten(0, 1), teacher.flatten(0, 1), model.output_weight,
                             row_weights.repeat(positions.numel() // block_size))


# ---------------------------------------------------------------------------------------------------------
# Optimisation helpers shared with scripts/make_default_model.py's base pretraining.

def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak * min_ratio at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class StepBudget:
    """Fixes the number of optimizer steps: the requested count, cut to what fits in `max_minutes` once
    CALIBRATION_STEPS steps have been timed. The count is then fixed, so re-running with `--steps` equal to
    the reported count reproduces the schedule exactly."""

    def __init__(self, total_steps: int, max_minutes: float | None, started: float, calibrate: bool):
        self.total = total_steps
        self.deadline = None if max_minutes is None else started + 60.0 * max_minutes
        self.calibrate = calibrate and self.deadline is not None
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.stopped_by_time = False

    def record(self, step: int, seconds: float, warm: bool) -> None:
        if not warm:
            return
        self.timed_steps += 1
        self.timed_seconds += seconds
        if self.calibrate and self.timed_steps == CALIBRATION_STEPS:
            per_step = self.timed_seconds / self.timed_steps
            # 10% of what is left is kept for evaluation, saving and the final checkpoint.
            fitting = step + 1 + int(0.9 * (self.deadline - time.time()) / per_step)
            self.total = max(step + 2, min(self.total, fitting))
            self.calibrate = False

    def done(self, step: int) -> bool:
        if step >= self.total:
            return True
        if self.deadline is not None and time.time() > self.deadline:
            self.stopped_by_time = True
            return True
        return False


class CompiledStep:
    """`function` under torch.compile, falling back to eager (once, with a note) if compiling fails: how
    far compilation gets varies between torch builds, and a long run should not die on it."""

    def __init__(self, function, enabled: bool, log):
        self.function, self.log = function, log
        self.compiled = torch.compile(function) if enabled else None

    def __call__(self, *args):
        if self.compiled is None:
            return self.function(*args)
        try:
            return self.compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # dynamo / inductor errors have no common base class
            self.log(f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                     "continuing without it")
            self.compiled = None
            return self.function(*args)


# ---------------------------------------------------------------------------------------------------------
# Data.

def read_documents(paths: list[str]) -> list[str]:
    """Text of every document: a .jsonl file gives one document per line (its "text" field), any other
    file is one document; a directory contributes every such file under it (hidden files and files that
    are not UTF-8 text are skipped)."""
    documents = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise OrthrusError(f"--data {raw}: no such file or directory")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts))
            if not files:
                raise OrthrusError(f"--data {raw}: the directory holds no files")
        else:
            files = [path]
        for file in files:
            if file.suffix == ".jsonl":
                documents.extend(_jsonl_texts(file))
                continue
            try:
                documents.append(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                if not path.is_dir():
                    raise OrthrusError(f"--data {file}: not UTF-8 text") from None
    documents = [d for d in documents if d]
    if not documents:
        raise OrthrusError(f"--data {' '.join(paths)}: no text found")
    return documents


def _jsonl_texts(file: Path) -> list[str]:
    texts = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise OrthrusError(f"--data {file}:{number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise OrthrusError(f"--data {file}:{number}: expected an object with a string field 'text'")
            texts.append(record["text"])
    return texts


def token_stream(documents: list[str], tokenizer: Tokenizer, separator: int | None, seed: int) -> torch.Tensor:
    """All documents, in a seeded order, tokenized and joined by the separator (the EOS token)."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    pieces = []
    for ids in tokenizer.encode_batch([documents[i] for i in order]):
        pieces.extend(ids)
        if separator is not None:
            pieces.append(separator)
    return torch.tensor(pieces, dtype=torch.int64)


@torch.no_grad()
def sample_sequences(model: TrainableQwen3, prompts: torch.Tensor, length: int, temperature: float,
                     generator: torch.Generator, autocast: "Autocast") -> torch.Tensor:
    """Continue each prompt row [batch, prompt_len] to `length` tokens by sampling the AR view (greedy at
    temperature 0)."""
    batch, prompt_len = prompts.shape
    config, device = model.config, prompts.device
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    cache_dtype = autocast.dtype or model.embed.dtype
    cache = [(torch.empty(shape, device=device, dtype=cache_dtype),
              torch.empty(shape, device=device, dtype=cache_dtype)) for _ in range(config.num_hidden_layers)]
    out = torch.empty(batch, length, dtype=torch.int64, device=device)
    out[:, :prompt_len] = prompts
    with autocast():
        hidden, _ = model.ar_forward(prompts, cache, 0)
        for position in range(prompt_len, length):
            logits = F.linear(hidden[:, -1], model.output_weight).float()
            if temperature == 0:
                token = logits.argmax(-1)
            else:  # drawn on the CPU so that the seeded generator gives the same sequences on every device
                probabilities = torch.softmax(logits / temperature, dim=-1).cpu()
                token = torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(device)
            out[:, position] = token
            if position + 1 < length:
                hidden, _ = model.ar_forward(token[:, None], cache, position)
    return out


GENERATION_MEMORY_FRACTION = 8  # sampling's KV cache may take 1/8 of the free GPU memory
GENERATION_CPU_BYTES = 1 << 30


def generation_batch(model: TrainableQwen3, length: int, count: int, cache_dtype: torch.dtype) -> int:
    """How many sequences to sample at once: a sampling step is one row per sequence, so its cost is
    almost all per-kernel overhead, and the batch is as large as the KV cache's memory allows."""
    config = model.config
    per_sequence = (2 * config.num_hidden_layers * length * config.num_key_value_heads * config.head_dim
                    * torch.empty((), dtype=cache_dtype).element_size())
    device = model.embed.device
    budget = (torch.cuda.mem_get_info(device)[0] // GENERATION_MEMORY_FRACTION if device.type == "cuda"
              else GENERATION_CPU_BYTES)
    return max(1, min(count, budget // per_sequence))


def self_distilled(model: TrainableQwen3, count: int, seq_len: int, temperature: float, prompt_tokens: int,
                   eos: int | None, prompt_stream: torch.Tensor | None, seed: int, autocast: "Autocast",
                   progress: bool) -> torch.Tensor:
    """`count` sequences sampled from the base: each continues `prompt_tokens` tokens taken at a seeded
    random place of `prompt_stream` when there is one, else the EOS token alone."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    if prompt_stream is not None:
        if prompt_stream.numel() < prompt_tokens:
            raise OrthrusError(f"self-distillation prompts of {prompt_tokens} tokens: the prompt text holds only "
                               f"{prompt_stream.numel()} tokens")
        starts = torch.randint(0, prompt_stream.numel() - prompt_tokens + 1, (count,), generator=generator)
        prompts = prompt_stream[starts[:, None] + torch.arange(prompt_tokens)]
    elif eos is not None:
        prompts = torch.full((count, 1), eos, dtype=torch.int64)
    else:
        raise OrthrusError("--self-distill without --data or --self-distill-prompts starts from the EOS token, "
                           "and the base defines none")
    device = model.embed.device
    batch = generation_batch(model, seq_len, count, autocast.dtype or model.embed.dtype)
    pieces = []
    for start in tqdm(range(0, count, batch), desc="sampling from the base", disable=not progress):
        pieces.append(sample_sequences(model, prompts[start:start + batch].to(device), seq_len, temperature,
                                       generator, autocast).cpu())
    return torch.cat(pieces)


class Autocast:
    """bf16/fp16 autocast on CUDA (frozen weights in that dtype, trained ones fp32); a no-op for fp32."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, None if dtype == torch.float32 else dtype

    def __call__(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints.

def read_base(base) -> tuple[Path, dict, ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    directory = resolve_checkpoint(base)
    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OrthrusError(f"--base {base}: no config.json (pass a Hugging Face Qwen3 checkpoint directory)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OrthrusError(f"{config_path}: not valid JSON ({error})") from None
    config = ModelConfig.from_dict(raw, str(config_path))
    if config.model_type != "qwen3" or config.has_diffusion_view:
        raise OrthrusError(f"--base {base}: model_type is {config.model_type!r}, expected a plain 'qwen3' "
                           "checkpoint (an Orthrus checkpoint already has a diffusion view; pass its base)")
    tensors = CheckpointTensors(directory)
    shapes = expected_shapes(config, with_diffusion=False)
    names = tensors.names()
    if any("_diff." in name for name in names):
        raise OrthrusError(f"--base {base}: the checkpoint already holds *_diff tensors; pass a plain Qwen3")
    missing = sorted(set(shapes) - names)
    if missing:
        raise OrthrusError(f"--base {base}: missing tensor(s) {', '.join(missing[:5])}")
    weights = {}
    for name in shapes:
        tensor = tensors.read(name)
        if tuple(tensor.shape) != shapes[name]:
            raise OrthrusError(f"--base {base}: tensor {name} has shape {tuple(tensor.shape)}, "
                               f"expected {shapes[name]}")
        weights[name] = tensor
    tokenizer = Tokenizer.from_directory(directory)
    if tokenizer is None:
        raise OrthrusError(f"--base {base}: no tokenizer.json (needed to read --data, pick the mask token "
                           "and complete the output checkpoint)")
    return directory, raw, config, weights, tokenizer


def choose_mask_token(requested: int | None, raw: dict, config: ModelConfig, tokenizer: Tokenizer) -> int:
    """--mask-token-id, else the base's mask_token_id, else the tokenizer's <|mask|>, else the first
    embedding row past the tokenizer's vocabulary (a row no text ever produces, as in released models)."""
    if requested is not None:
        if not 0 <= requested < config.vocab_size:
            raise OrthrusError(f"--mask-token-id {requested} is outside the vocabulary [0, {config.vocab_size})")
        if requested in tokenizer.eos_token_ids or requested in config.eos_token_ids:
            raise OrthrusError(f"--mask-token-id {requested} is the EOS token")
        return requested
    if isinstance(raw.get("mask_token_id"), int):
        return raw["mask_token_id"]
    named = tokenizer.token_to_id(MASK_TOKEN)
    if named is not None and named < config.vocab_size:
        return named
    if tokenizer.vocab_size < config.vocab_size:
        return tokenizer.vocab_size
    raise OrthrusError(
        f"the base's vocabulary has no free id for the mask token: the tokenizer uses all {config.vocab_size} "
        f"ids and has no {MASK_TOKEN} token; pass --mask-token-id with an id that never occurs in text")


def save_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most max_shard_bytes plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor.contiguous()
        current_bytes += size
    shards.append(current)
    for stale in list(directory.glob("model*.safetensors")) + [directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists() and source.resolve() != destination.resolve():
            shutil.copyfile(source / name, destination / name)


def write_orthrus_checkpoint(out: Path, base_dir: Path, raw_config: dict, base_weights: dict,
                             diffusion: dict[str, torch.Tensor], block_size: int, mask_token_id: int,
                             max_shard_bytes: int) -> None:
    """Base tensors unchanged, then the *_diff tensors in the base's dtype, per layer in HF order."""
    dtype = base_weights["model.layers.0.self_attn.q_proj.weight"].dtype
    tensors = {}
    for name, tensor in base_weights.items():
        tensors[name] = tensor
        if name.endswith("self_attn.k_norm.weight"):  # the layer's last base attention tensor
            prefix = name[:-len("k_norm.weight")]
            for suffix in DIFFUSION_SUFFIXES:
                tensors[f"{prefix}{suffix}.weight"] = diffusion[f"{prefix}{suffix}.weight"].to("cpu", dtype)
    config = dict(raw_config, model_type="orthrus", block_size=block_size, mask_token_id=mask_token_id)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, tensors, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer_files(base_dir, out)


def in_memory_model(config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer, device, dtype):
    """An engine `Model` over the given HF-named tensors (the loader's checks included), for evaluation."""
    from .engine import Model
    from .loader import build_network

    class Tensors:  # the part of CheckpointTensors that build_network reads
        directory = Path("<training>")
        total_bytes = 0
        location = {name: Path("<training>") for name in tensors}

        @staticmethod
        def names():
            return set(tensors)

        @staticmethod
        def read(name):
            return tensors[name]

    return Model(config, build_network(config, Tensors(), device, dtype), tokenizer, "<training>")


# ---------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out: Path
    steps: int
    total_steps: int
    loss: float
    tokens_per_second: float
    tau: float | None
    history: list = field(default_factory=list)  # (step, loss, tokens/s, tau or None)
    stopped_by_time: bool = False


class TauEvaluator:
    """Held-out τ: greedy Model.generate(mode="orthrus") with the current weights, averaged over prompts."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, device: torch.device,
                 dtype: torch.dtype, log):
        from . import ops

        self.prompts, self.max_new_tokens, self.dtype = prompts, max_new_tokens, dtype
        self.device, self.reason = device, None
        try:
            ops.check_device(device)
        except OrthrusError as error:
            try:
                ops.check_device(torch.device("cpu"))
                self.device, self.dtype = torch.device("cpu"), torch.float32
                log(f"held-out τ runs on the CPU: {error}")
            except OrthrusError as cpu_error:
                self.reason = str(cpu_error)
                log(f"held-out τ is not measured: {cpu_error}")

    def __call__(self, config: ModelConfig, tensors: dict, tokenizer) -> float | None:
        if self.reason is not None or not self.prompts:
            return None
        model = in_memory_model(config, tensors, tokenizer, self.device, self.dtype)
        limit = config.max_position_embeddings
        taus = [model.generate(prompt, max_new_tokens=min(self.max_new_tokens, limit - len(prompt)),
                               mode="orthrus", temperature=0.0).stats["tokens_per_iteration"]
                for prompt in self.prompts if len(prompt) < limit]
        return sum(taus) / len(taus) if taus else None


def _fingerprint(**options) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}


def train(base, out, *, data=None, self_distill: int = 0, self_distill_temperature: float = 0.8,
          self_distill_prompts=None, self_distill_prompt_tokens: int = 16, row_decay: float = 1.0,
          block_size: int = 32, mask_token_id: int | None = None, seq_len: int = 2048,
          blocks_per_sequence: int = 256, batch_size: int = 8, micro_batch_size: int | None = None,
          steps: int | None = None, epochs: float = 1.0, max_minutes: float | None = None,
          lr: float = 2e-4, min_lr_ratio: float = 0.1, warmup_steps: int | None = None,
          weight_decay: float = 0.0, grad_clip: float = 1.0, eval_every: int = 200, eval_prompts=8,
          eval_new_tokens: int = 128, save_every: int = 500, seed: int = 0, device=None, dtype=None,
          compile: bool | None = None, max_shard_mb: float = 4000.0, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train the diffusion view of the Qwen3 at `base`; writes an Orthrus checkpoint into `out`.

    `eval_prompts`: how many held-out prompts (carved from the end of the data) τ is measured on, or the
    prompts themselves (strings or token-id lists). Returns the run's summary; see `orthrus train --help`."""
    from tqdm import tqdm

    started = time.time()

    def log(message: str) -> None:
        tqdm.write(f"orthrus train: {message}", file=sys.stderr)

    # ---- arguments
    for name, value, minimum in (("block_size", block_size, 2), ("seq_len", seq_len, 4),
                                 ("blocks_per_sequence", blocks_per_sequence, 1), ("batch_size", batch_size, 1),
                                 ("self_distill", self_distill, 0), ("eval_every", eval_every, 0),
                                 ("self_distill_prompt_tokens", self_distill_prompt_tokens, 1),
                                 ("eval_new_tokens", eval_new_tokens, 1), ("save_every", save_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise OrthrusError(f"{name} must be an integer >= {minimum}, got {value!r}")
    micro_batch_size = micro_batch_size or batch_size
    if batch_size % micro_batch_size:
        raise OrthrusError(f"batch_size ({batch_size}) must be a multiple of micro_batch_size ({micro_batch_size})")
    if block_size + 1 > seq_len:
        raise OrthrusError(f"seq_len ({seq_len}) must exceed block_size ({block_size})")
    if not data and not self_distill:
        raise OrthrusError("no training data: pass --data PATH and/or --self-distill N")
    if self_distill_prompts and not self_distill:
        raise OrthrusError("--self-distill-prompts without --self-distill N: no sequences would be sampled")
    if not self_distill_prompt_tokens < seq_len:
        raise OrthrusError(f"self_distill_prompt_tokens ({self_distill_prompt_tokens}) must be below seq_len "
                           f"({seq_len})")
    if not 0 < row_decay <= 1:
        raise OrthrusError(f"row_decay must be in (0, 1], got {row_decay}")
    if steps is not None and steps < 1:
        raise OrthrusError(f"steps must be >= 1, got {steps}")
    if max_minutes is not None and not max_minutes > 0:
        raise OrthrusError(f"max_minutes must be > 0, got {max_minutes}")
    if not lr > 0:
        raise OrthrusError(f"lr must be > 0, got {lr}")
    blocks_per_sequence = min(blocks_per_sequence, seq_len - block_size)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OrthrusError("device cuda was requested but torch sees no CUDA device")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise OrthrusError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    compile = device.type == "cuda" if compile is None else compile
    out = Path(out).expanduser()
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    self_distill_prompts = [self_distill_prompts] if isinstance(self_distill_prompts, (str, os.PathLike)) \
        else list(self_distill_prompts or [])

    # ---- base model
    base_dir, raw_config, base_config, base_weights, tokenizer = read_base(base)
    if out.exists() and out.resolve() == base_dir.resolve():
        raise OrthrusError(f"--out {out} is the base checkpoint's directory; choose another")
    mask_token_id = choose_mask_token(mask_token_id, raw_config, base_config, tokenizer)
    orthrus_raw = dict(raw_config, model_type="orthrus", block_size=block_size, mask_token_id=mask_token_id)
    config = ModelConfig.from_dict(orthrus_raw, str(base_dir / "config.json"))
    state_path = out / STATE_FILE
    if state_path.exists() and not resume:
        raise OrthrusError(f"--out {out} already holds a training run ({STATE_FILE}); pass --resume to "
                           "continue it or choose another --out")
    if resume and not state_path.exists():
        raise OrthrusError(f"--resume: {state_path} does not exist")
    out.mkdir(parents=True, exist_ok=True)

    model = TrainableQwen3(config, {n: t.to(device=device, dtype=dtype) for n, t in base_weights.items()},
                           with_diffusion=True)
    model.requires_grad_(False)
    trained = model.diffusion_parameters()
    for parameter in trained:  # fp32 master weights; autocast runs the matmuls in `dtype`
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    model.reserve_positions(seq_len + block_size)
    autocast = Autocast(device, dtype)
    eos = next(iter(sorted(tokenizer.eos_token_ids | set(base_config.eos_token_ids))), None)

    # ---- data
    prompts: list[list[int]] = []
    if isinstance(eval_prompts, (list, tuple)):
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in eval_prompts]
        held_out = 0
    elif isinstance(eval_prompts, int) and not isinstance(eval_prompts, bool) and eval_prompts >= 0:
        held_out = eval_prompts if eval_every else 0
    else:
        raise OrthrusError(f"eval_prompts must be a count >= 0 or a list of prompts, got {eval_prompts!r}")
    sequences = []
    prompt_stream = None
    if data:
        stream = token_stream(read_documents(data), tokenizer, eos, seed)
        tail = held_out * EVAL_PROMPT_TOKENS
        if tail and stream.numel() - tail >= seq_len:
            prompts = stream[-tail:].view(held_out, EVAL_PROMPT_TOKENS).tolist()
            stream = stream[:-tail]
        usable = stream.numel() // seq_len * seq_len
        if usable == 0:
            raise OrthrusError(f"--data holds {stream.numel()} tokens, fewer than one sequence of "
                               f"--seq-len {seq_len}")
        sequences.append(stream[:usable].view(-1, seq_len))
        prompt_stream = stream
    if self_distill:
        distill_path = out / SELF_DISTILL_FILE
        if resume and distill_path.exists():
            sampled = torch.load(distill_path)
        else:
            if self_distill_prompts:
                prompt_stream = token_stream(read_documents(self_distill_prompts), tokenizer, eos, seed)
            sampled = self_distilled(model, self_distill + (held_out if not prompts else 0), seq_len,
                                     self_distill_temperature, self_distill_prompt_tokens, eos, prompt_stream,
                                     seed, autocast, progress)
            torch.save(sampled, distill_path)
        if not prompts and held_out:
            prompts = sampled[-held_out:, :EVAL_PROMPT_TOKENS].tolist()
            sampled = sampled[:-held_out]
        sequences.append(sampled)
    sequences = torch.cat(sequences)
    if steps is None:
        steps = max(1, math.ceil(epochs * sequences.shape[0] / batch_size))
    warmup_steps = warmup_steps if warmup_steps is not None else max(1, round(0.05 * steps))

    # ---- optimizer, resume
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                  fused=device.type == "cuda")
    fingerprint = _fingerprint(base=base_dir.resolve(), block_size=block_size, mask_token_id=mask_token_id,
                               seq_len=seq_len, blocks_per_sequence=blocks_per_sequence, batch_size=batch_size,
                               seed=seed, data=[str(Path(d).resolve()) for d in data], self_distill=self_distill,
                               self_distill_temperature=self_distill_temperature,
                               self_distill_prompts=[str(Path(d).resolve()) for d in self_distill_prompts],
                               self_distill_prompt_tokens=self_distill_prompt_tokens, row_decay=row_decay,
                               lr=lr, warmup_steps=warmup_steps)
    step, elapsed_before = 0, 0.0
    budget = StepBudget(steps, max_minutes, started, calibrate=True)
    history = []
    if resume:
        state = torch.load(state_path, map_location=device, weights_only=False)
        changed = [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]
        if changed:
            raise OrthrusError(f"--resume: {', '.join(changed)} differ(s) from the run saved in {state_path}")
        with torch.no_grad():
            for parameter, saved in zip(trained, state["diffusion"]):
                parameter.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        budget.total, budget.calibrate = state["total_steps"], False
        log(f"resuming at step {step} of {budget.total}")

    def save_state() -> None:
        temporary = state_path.with_suffix(".tmp")
        torch.save({"fingerprint": fingerprint, "step": step, "total_steps": budget.total, "history": history,
                    "diffusion": [p.detach() for p in trained], "optimizer": optimizer.state_dict()}, temporary)
        os.replace(temporary, state_path)

    def current_tensors() -> dict:
        tensors = dict(base_weights)
        tensors.update(model.hf_tensors(diffusion_only=True))
        return tensors

    evaluate = TauEvaluator(prompts, eval_new_tokens, device, dtype, log) if eval_every and prompts else None
    step_loss = CompiledStep(diffusion_step_loss, compile, log)
    # A draft is accepted only when every row before it was right, so far rows, which a small model can
    # hardly predict, may be weighed down (--row-decay) to keep them from dominating the gradient.
    row_weights = row_decay ** torch.arange(block_size, device=device, dtype=torch.float32)
    accumulation = batch_size // micro_batch_size
    tokens_per_step = batch_size * seq_len
    log(f"{sequences.shape[0]} sequences of {seq_len} tokens, {blocks_per_sequence} blocks of {block_size} "
        f"each, mask token {mask_token_id}; {budget.total} steps of {batch_size} sequences on {device}")

    bar = tqdm(total=budget.total, initial=step, desc="orthrus train", unit="step", disable=not progress,
               dynamic_ncols=True)
    last_loss, tau = float("nan"), None
    if evaluate is not None and step == 0:
        tau = evaluate(config, current_tensors(), tokenizer)
        history.append((0, None, None, tau))
    while not budget.done(step):
        step_started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, budget.total, warmup_steps, lr, min_lr_ratio)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        order = epoch_order(step, batch_size, sequences.shape[0], seed)
        loss_sum = 0.0
        for micro in range(accumulation):
            rows = order[micro * micro_batch_size:(micro + 1) * micro_batch_size]
            batch = sequences[rows].to(device, non_blocking=True)
            anchors = sample_anchors(micro_batch_size, seq_len, block_size, blocks_per_sequence,
                                     generator).to(device)
            mask = block_mask(anchors, seq_len, block_size)
            with autocast():
                loss = step_loss(model, batch, anchors, mask, block_size, mask_token_id, row_weights)
            (loss / accumulation).backward()
            loss_sum += loss.detach()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = float(loss_sum) / accumulation
        step += 1
        seconds = time.perf_counter() - step_started
        budget.record(step - 1, seconds, warm=step > SPEED_WARMUP_STEPS)
        bar.total = budget.total
        speed = (tokens_per_step * budget.timed_steps / budget.timed_seconds) if budget.timed_steps else (
            tokens_per_step / seconds)
        evaluated = evaluate is not None and (step % eval_every == 0 or budget.done(step))
        if evaluated:
            tau = evaluate(config, current_tensors(), tokenizer)
        history.append((step, last_loss, speed, tau if evaluated else None))
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{speed:,.0f}",
                        tau="-" if tau is None else f"{tau:.2f}", refresh=False)
        bar.update()
        if save_every and step % save_every == 0:
            save_state()
    bar.close()
    if budget.stopped_by_time:
        log(f"stopped by --max-minutes after {step} of {budget.total} steps")
    save_state()
    write_orthrus_checkpoint(out, base_dir, raw_config, base_weights, model.hf_tensors(diffusion_only=True),
                             block_size, mask_token_id, int(max_shard_mb * 1e6))
    speed = tokens_per_step * budget.timed_steps / budget.timed_seconds if budget.timed_steps else float("nan")
    log(f"wrote {out}: {step} steps, loss {last_loss:.4f}, {speed:,.0f} training tokens/s"
        + ("" if tau is None else f", held-out τ {tau:.2f}"))
    return TrainResult(out=out, steps=step, total_steps=budget.total, loss=last_loss, tokens_per_second=speed,
                       tau=tau, history=history, stopped_by_time=budget.stopped_by_time)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(count: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))


def epoch_order(step: int, batch_size: int, count: int, seed: int) -> torch.Tensor:
    """The sequence indices of optimizer step `step`: a seeded permutation per epoch, so a resumed run sees
    exactly the batches the uninterrupted run would have."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        indices.append(_epoch_permutation(count, seed, epoch)[offset])
    return torch.stack(indices)


# ---------------------------------------------------------------------------------------------------------
# Command line.

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through the CLI's error path instead of usage + exit
        raise OrthrusError(f"orthrus train: {message} (see orthrus train --help)")


def _dtype(name: str) -> torch.dtype:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
    return choices[name]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orthrus train", description="Train the diffusion view of a Qwen3 checkpoint "
                     "(the base stays frozen) and write an Orthrus checkpoint.")
    add = parser.add_argument
    add("--base", required=True, help="Hugging Face Qwen3 checkpoint directory or hub id")
    add("--out", required=True, help="output directory: the Orthrus checkpoint and the resumable state")
    add("--data", nargs="+", action="extend", help="text files, directories or JSONL files (field 'text')")
    add("--self-distill", type=int, default=0, metavar="N", help="add N sequences sampled from the base")
    add("--self-distill-temperature", type=float, default=0.8, help="0: greedy")
    add("--self-distill-prompts", nargs="+", action="extend", metavar="PATH",
        help="text the sampled sequences start from (default: --data; files as for --data)")
    add("--self-distill-prompt-tokens", type=int, default=16, metavar="N",
        help="tokens of prompt text each sampled sequence continues")
    add("--row-decay", type=float, default=1.0, metavar="G", help="block row j's loss weighs G**j (1: all equal)")
    add("--block-size", type=int, default=32, help="anchor + masks per block (default 32)")
    add("--mask-token-id", type=int, default=None,
        help="default: the base's mask_token_id, its tokenizer's <|mask|>, or the first id past the tokenizer")
    add("--seq-len", type=int, default=2048, help="tokens per packed training sequence")
    add("--blocks-per-sequence", type=int, default=256)
    add("--batch-size", type=int, default=8, help="sequences per optimizer step")
    add("--micro-batch-size", type=int, default=None, help="sequences per forward (gradient accumulation)")
    add("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    add("--epochs", type=float, default=1.0)
    add("--max-minutes", type=float, default=None, help="time budget: the step count is cut to fit it")
    add("--lr", type=float, default=2e-4, help="peak learning rate (warm-up, then cosine)")
    add("--min-lr-ratio", type=float, default=0.1)
    add("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    add("--weight-decay", type=float, default=0.0)
    add("--grad-clip", type=float, default=1.0)
    add("--eval-every", type=int, default=200, help="steps between held-out τ measurements (0: never)")
    add("--eval-prompts", type=int, default=8, help="held-out prompts carved from the end of the data")
    add("--eval-new-tokens", type=int, default=128)
    add("--save-every", type=int, default=500, help="steps between resumable states (0: only at the end)")
    add("--seed", type=int, default=0)
    add("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add("--dtype", type=_dtype, default=None, help="frozen-weight / autocast dtype (default bfloat16 on "
        "CUDA, float32 on CPU)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the step "
        "(default: on CUDA)")
    add("--max-shard-mb", type=float, default=4000.0, help="largest safetensors shard of the output")
    add("--resume", action="store_true", help="continue the run saved in --out")
    add("--no-progress", dest="progress", action="store_false")
    return parser


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    result = train(args.pop("base"), args.pop("out"), **args)
    print(json.dumps({"out": str(result.out), "steps": result.steps, "loss": result.loss,
                      "tokens_per_second": result.tokens_per_second, "tau": result.tau,
                      "stopped_by_time": result.stopped_by_time}))
    return 0
