"""The small Orthrus model shipped inside the package, so `orthrus generate` works with no download.

It is made by benchmarks/../scripts/make_default_model.py (see README): a Qwen3-architecture base trained
from scratch on CPython's standard library, then its diffusion view trained with `orthrus train`."""

from __future__ import annotations

from pathlib import Path

from ..errors import OrthrusError

DIRECTORY = Path(__file__).parent


def default_model_path() -> Path:
    if not (DIRECTORY / "config.json").exists():
        raise OrthrusError(f"{DIRECTORY}: this build ships no embedded default model; pass --model PATH")
    return DIRECTORY
