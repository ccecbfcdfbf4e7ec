"""`orthrus.load`: a Hugging Face-format Qwen3 or Orthrus checkpoint directory (or hub id) -> `Model`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from . import ops
from .config import ModelConfig
from .engine import Model
from .errors import OrthrusError
from .model import AttentionWeights, LayerWeights, Qwen3
from .tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROGRESS_BAR_BYTES = 256 << 20


def load(path, device=None, dtype=None) -> Model:
    """Load a checkpoint. `device` defaults to CUDA when available, else CPU; `dtype` to bfloat16 on CUDA
    and float32 on CPU."""
    directory = resolve_checkpoint(path)
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise OrthrusError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")

    config = ModelConfig.from_file(directory / "config.json")
    tensors = CheckpointTensors(directory)
    network = build_network(config, tensors, device, dtype)
    return Model(config, network, Tokenizer.from_directory(directory), str(path),
                 extra_eos_token_ids=generation_eos_ids(directory))


def resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise OrthrusError(f"device {device!r} is not a valid torch device ({error})") from None
    if device.type == "cuda":
        # torch.cuda.current_device() fails with a bare AssertionError on a CPU-only torch.
        if not torch.cuda.is_available():
            raise OrthrusError(f"device {device}: CUDA is not available here (torch {torch.__version__}); "
                               "use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise OrthrusError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    ops.check_device(device)
    return device


def generation_eos_ids(directory: Path) -> set[int]:
    """Released Qwen3 checkpoints list their end-of-turn ids in generation_config.json."""
    path = directory / "generation_config.json"
    if not path.exists():
        return set()
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise OrthrusError(f"{path}: not a valid JSON object ({error})") from None
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise OrthrusError(f"{path}: 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    return set(ids)


def resolve_checkpoint(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise OrthrusError(f"model path must be a str or path, got {type(path).__name__}")
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise OrthrusError(f"{local}: not a directory (pass the checkpoint directory holding config.json)")
    name = str(path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise OrthrusError(f"{name}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OrthrusError(f"{name}: no such local directory, and huggingface_hub is not installed to fetch it "
                           "as a hub id; pass a local checkpoint directory") from None
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        raise OrthrusError(f"{name}: no such local directory, and fetching it from the hub failed "
                           f"({type(error).__name__}: {error}); pass a local checkpoint directory") from None


class CheckpointTensors:
    """The tensors of a single-file or sharded safetensors checkpoint, read one at a time."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
                raise OrthrusError(f"{index_path}: not a readable JSON file ({error})") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            # Shards are plain file names next to the index: anything else would read files outside the
            # checkpoint directory (or fail later with a TypeError on a non-string entry).
            if not isinstance(weight_map, dict) or not all(
                    isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file
                    for file in weight_map.values()):
                raise OrthrusError(f"{index_path}: needs a 'weight_map' object mapping tensor names to shard "
                                   "file names in the checkpoint directory")
            files = sorted(set(weight_map.values()))
        elif single_path.exists():
            files = [SINGLE_FILE]
        else:
            raise OrthrusError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

        self.location: dict[str, Path] = {}
        self.handles = {}
        self.total_bytes = 0
        for file in files:
            shard = directory / file
            if not shard.exists():
                raise OrthrusError(f"{shard}: shard listed in {INDEX_FILE} is missing")
            try:
                handle = safe_open(str(shard), framework="pt")
                names = list(handle.keys())
            except Exception as error:
                raise OrthrusError(f"{shard}: cannot read safetensors file ({error})") from None
            self.handles[shard] = handle
            self.total_bytes += shard.stat().st_size
            for name in names:
                self.location[name] = shard
        if index_path.exists():
            for name, file in weight_map.items():
                if self.location.get(name) != directory / file:
                    raise OrthrusError(f"{index_path}: tensor {name} is not in its listed shard {file}")

    def names(self) -> set[str]:
        return set(self.location)

    def read(self, name: str) -> torch.Tensor:
        shard = self.location[name]
        try:
            return self.handles[shard].get_tensor(name)
        except Exception as error:
            raise OrthrusError(f"{shard}: cannot read tensor {name} ({error})") from None


def expected_shapes(config: ModelConfig, with_diffusion: bool) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    attention = {"q_proj": (q_size, hidden), "k_proj": (kv_size, hidden), "v_proj": (kv_size, hidden),
                 "o_proj": (hidden, q_size), "q_norm": (head_dim,), "k_norm": (head_dim,)}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes[prefix + "mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, config.intermediate_size)
        for suffix in ("",) + (("_diff",) if with_diffusion else ()):
            for name, shape in attention.items():
                shapes[f"{prefix}self_attn.{name}{suffix}.weight"] = shape
    return shapes


def build_network(config: ModelConfig, tensors: CheckpointTensors, device, dtype) -> Qwen3:
    present = tensors.names()
    has_diff = any("_diff." in name for name in present)
    if has_diff and not config.has_diffusion_view:
        raise OrthrusError(f"{tensors.directory / 'config.json'}: the checkpoint has *_diff tensors but no "
                           "'block_size' and 'mask_token_id' fields")
    shapes = expected_shapes(config, config.has_diffusion_view)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(shapes) - present)
    if missing:
        raise OrthrusError(f"{tensors.directory}: checkpoint is missing tensor(s) "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(present - set(shapes) - optional)
    if unexpected:
        raise OrthrusError(f"{tensors.location[unexpected[0]]}: unexpected tensor(s) "
                           f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")

    progress = None
    if tensors.total_bytes >= PROGRESS_BAR_BYTES:
        from tqdm import tqdm
        progress = tqdm(total=len(shapes), desc="loading weights", unit="tensor", file=sys.stderr)

    def get(name: str) -> torch.Tensor:
        tensor = tensors.read(name)
        if tuple(tensor.shape) != shapes[name]:
            raise OrthrusError(f"{tensors.location[name]}: tensor {name} has shape {tuple(tensor.shape)}, "
                               f"expected {shapes[name]}")
        if not tensor.is_floating_point():
            raise OrthrusError(f"{tensors.location[name]}: tensor {name} has dtype {tensor.dtype}, "
                               "expected a floating-point dtype")
        if progress is not None:
            progress.update()
        return tensor.to(device=device, dtype=dtype).contiguous()

    def attention(prefix: str, suffix: str) -> AttentionWeights:
        q, k, v = (get(f"{prefix}self_attn.{p}{suffix}.weight") for p in ATTENTION_PROJECTIONS[:3])
        return AttentionWeights(qkv=torch.cat([q, k, v]), o=get(f"{prefix}self_attn.o_proj{suffix}.weight"),
                                q_norm=get(f"{prefix}self_attn.q_norm{suffix}.weight"),
                                k_norm=get(f"{prefix}self_attn.k_norm{suffix}.weight"))

    embed = get("model.embed_tokens.weight")
    layers = []
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layers.append(LayerWeights(
            input_norm=get(prefix + "input_layernorm.weight"),
            post_attention_norm=get(prefix + "post_attention_layernorm.weight"),
            gate_up=torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")]),
            down=get(prefix + "mlp.down_proj.weight"),
            ar=attention(prefix, ""),
            diffusion=attention(prefix, "_diff") if config.has_diffusion_view else None,
        ))
    final_norm = get("model.norm.weight")
    lm_head = embed if config.tie_word_embeddings else get("lm_head.weight")
    if progress is not None:
        progress.close()
    return Qwen3(config, embed, layers, final_norm, lm_head)
