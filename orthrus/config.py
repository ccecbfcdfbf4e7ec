"""config.json of a Qwen3 or Orthrus checkpoint, validated: every problem names the file and the field."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import OrthrusError

MODEL_TYPES = ("qwen3", "orthrus")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "qwen3"
    # Orthrus checkpoints only: the diffusion view drafts block_size - 1 tokens per iteration.
    block_size: int | None = None
    mask_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_diffusion_view(self) -> bool:
        return self.block_size is not None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise OrthrusError(f"{source}: expected a JSON object, got {type(raw).__name__}")

        def integer(name, default=None, minimum=1):
            value = raw.get(name, default)
            if value is None:
                raise OrthrusError(f"{source}: missing required field '{name}'")
            if isinstance(value, bool) or not isinstance(value, int):
                raise OrthrusError(f"{source}: field '{name}' must be an integer, got {value!r}")
            if value < minimum:
                raise OrthrusError(f"{source}: field '{name}' must be >= {minimum}, got {value}")
            return value

        def number(name, default):
            value = raw.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise OrthrusError(f"{source}: field '{name}' must be a positive number, got {value!r}")
            return float(value)

        model_type = raw.get("model_type", "qwen3")
        if model_type not in MODEL_TYPES:
            raise OrthrusError(f"{source}: model_type {model_type!r} is not supported (expected one of {MODEL_TYPES})")
        if raw.get("attention_bias"):
            raise OrthrusError(f"{source}: attention_bias=true is not supported (Qwen3 has no attention bias)")

        heads = integer("num_attention_heads")
        hidden = integer("hidden_size")
        kv_heads = integer("num_key_value_heads", heads)
        if heads % kv_heads:
            raise OrthrusError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = integer("head_dim", hidden // heads if hidden % heads == 0 else None)
        if head_dim % 2:
            raise OrthrusError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")

        rope_theta = raw.get("rope_theta")
        rope_parameters = raw.get("rope_parameters") or raw.get("rope_scaling")
        if isinstance(rope_parameters, dict):
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default":
                raise OrthrusError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
        elif rope_parameters is not None:
            raise OrthrusError(f"{source}: field 'rope_parameters' must be an object, got {rope_parameters!r}")
        rope_theta = 1_000_000.0 if rope_theta is None else rope_theta
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
            raise OrthrusError(f"{source}: field 'rope_theta' must be a positive number, got {rope_theta!r}")

        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else eos
        if not isinstance(eos_ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise OrthrusError(f"{source}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")

        vocab_size = integer("vocab_size")
        block_size = mask_token_id = None
        if model_type == "orthrus" or "block_size" in raw or "mask_token_id" in raw:
            block_size = integer("block_size", minimum=2)
            mask_token_id = integer("mask_token_id", minimum=0)
            if mask_token_id >= vocab_size:
                raise OrthrusError(
                    f"{source}: mask_token_id {mask_token_id} is outside the vocabulary (vocab_size {vocab_size})")

        tie = raw.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise OrthrusError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")

        known = {f for f in cls.__dataclass_fields__}
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=integer("max_position_embeddings", 40960),
            tie_word_embeddings=tie,
            eos_token_ids=tuple(eos_ids),
            model_type=model_type,
            block_size=block_size,
            mask_token_id=mask_token_id,
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OrthrusError(f"{path}: file not found (a checkpoint directory needs config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OrthrusError(f"{path}: not valid JSON ({error})") from None
        except OSError as error:
            raise OrthrusError(f"{path}: cannot read ({error.strerror or error})") from None
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict:
        """The HF-style config.json content (what `orthrus train` writes)."""
        out = dict(self.extra)
        out.update({k: v for k, v in asdict(self).items() if k not in ("extra", "eos_token_ids")})
        if self.eos_token_ids:
            out["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        if self.block_size is None:
            out.pop("block_size")
            out.pop("mask_token_id")
        out["architectures"] = ["Qwen3ForCausalLM"]
        return out
