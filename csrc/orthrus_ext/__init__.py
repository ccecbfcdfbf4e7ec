"""orthrus_ext: Orthrus's row-invariant decode kernels (CPU, and CUDA when built with it) as torch ops.

The compiled module links against libtorch, which `import torch` loads; importing it here first is what
lets `import orthrus_ext` work on its own."""

import torch  # noqa: F401

from ._C import (accept, add_rms_norm, attention, embedding_rms_norm, has_cuda, linear, linear_add_deferred_norm,
                 linear_argmax, linear_qk_norm_rope_store, linear_silu_mul, qk_norm_rope_store, rms_norm, silu_mul)

__all__ = ["accept", "add_rms_norm", "attention", "embedding_rms_norm", "has_cuda", "linear",
           "linear_add_deferred_norm", "linear_argmax", "linear_qk_norm_rope_store", "linear_silu_mul",
           "qk_norm_rope_store", "rms_norm", "silu_mul"]
