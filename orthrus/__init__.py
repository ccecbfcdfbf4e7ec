"""Orthrus: exact multi-token decoding for Qwen3 (dual-view diffusion drafting + AR verification)."""

from .engine import GenerationResult, Model
from .errors import OrthrusError
from .loader import load

__all__ = ["load", "Model", "GenerationResult", "OrthrusError"]
__version__ = "0.1.0"
