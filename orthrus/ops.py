"""The model's kernels, chosen by block size.

Blocks of at most MAX_BLOCK_ROWS rows (AR steps, verify and diffusion passes) run the row-invariant
kernels of `orthrus_ext`: a row's bits never depend on how many rows share the call, which is what makes
a verify pass reproduce one-token AR steps exactly. Longer blocks only occur in prefill, which AR and
Orthrus decoding run identically, so there PyTorch's fastest kernels are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import OrthrusError

try:
    import orthrus_ext
except ImportError as _error:  # a source checkout that was never built
    orthrus_ext = None
    _import_error = _error

MAX_BLOCK_ROWS = 64


def extension():
    if orthrus_ext is None:
        raise OrthrusError(
            f"the C++ extension orthrus_ext is not importable ({_import_error}); install the package with "
            "`pip install .` so that it is built")
    return orthrus_ext


def check_device(device: torch.device) -> None:
    """Fail early, with a useful message, when the extension cannot run on `device`."""
    ext = extension()
    if device.type == "cuda" and not ext.has_cuda():
        raise OrthrusError(
            "orthrus_ext was built without CUDA kernels; rebuild it on a machine with nvcc and a CUDA build "
            "of torch (`pip install .`), or load the model with device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise OrthrusError(f"device {device} is not supported (use 'cpu' or 'cuda')")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > MAX_BLOCK_ROWS:
        return F.linear(x, weight)
    return extension().linear(x, weight)


def linear_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(x, weight).argmax(-1): each row's greedy token (int64), without the logits on CUDA."""
    if x.shape[0] > MAX_BLOCK_ROWS:
        return F.linear(x, weight).argmax(-1)
    return extension().linear_argmax(x, weight)


def linear_silu_mul(x: torch.Tensor, gate_up: torch.Tensor, square_sums: torch.Tensor | None = None,
                    eps: float = 0.0) -> torch.Tensor:
    """SwiGLU of the [gate | up] projection of x: silu(x gate^T) * (x up^T); with square_sums, x is a
    deferred norm (linear_add_deferred_norm) that the projection finishes."""
    if x.shape[0] > MAX_BLOCK_ROWS:
        gate, up = _projection(x, gate_up, square_sums, eps).chunk(2, dim=-1)
        return F.silu(gate) * up
    return extension().linear_silu_mul(x, gate_up, square_sums, eps)


def linear_add_deferred_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                             norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """residual += linear(x, weight) in place, then the RMSNorm of residual, as (input, square_sums) for the
    next projection (linear_silu_mul, linear_qk_norm_rope_store).

    Up to MAX_BLOCK_ROWS rows the norm is deferred: input is residual * norm_weight and square_sums holds the
    rows' sums of squares, from which the projection scales its fp32 sums, so no norm kernel runs between
    the two linears. Longer blocks (prefill) get the normalised rows and None."""
    if x.shape[0] > MAX_BLOCK_ROWS:
        residual.add_(F.linear(x, weight))
        return reference_rms_norm(residual, norm_weight, eps), None
    return extension().linear_add_deferred_norm(x, weight, residual, norm_weight)


def _projection(x: torch.Tensor, weight: torch.Tensor, square_sums: torch.Tensor | None, eps: float) -> torch.Tensor:
    """linear(x, weight) for blocks past MAX_BLOCK_ROWS, with a deferred norm's row scale if any."""
    if square_sums is None:
        return F.linear(x, weight)
    scale = torch.rsqrt(square_sums.sum(-1, keepdim=True) / x.shape[1] + eps)
    return (F.linear(x.float(), weight.float()) * scale).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.shape[0] > MAX_BLOCK_ROWS:
        return reference_rms_norm(x, weight, eps)
    return extension().rms_norm(x, weight, eps)


def embedding_rms_norm(tokens: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, RMSNorm of x) for x = table[tokens], a new tensor: the residual stream a forward pass starts from."""
    if tokens.shape[0] > MAX_BLOCK_ROWS:
        x = table[tokens]
        return x, reference_rms_norm(x, weight, eps)
    return extension().embedding_rms_norm(tokens, table, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream), then RMSNorm of x."""
    if x.shape[0] > MAX_BLOCK_ROWS:
        x.add_(delta)
        return reference_rms_norm(x, weight, eps)
    return extension().add_rms_norm(x, delta, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def reference_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [rows, heads, head_dim] with cos|sin rows [rows, head_dim]."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def linear_qk_norm_rope_store(x, qkv_weight, q_norm_weight, k_norm_weight, rope_cos_sin, positions_start,
                              k_dst, v_dst, dst_start, eps, square_sums=None):
    """The fused q | k | v projection of x, then per-head RMSNorm and RoPE of q and k; k and v are stored at
    rows dst_start.. of k_dst / v_dst ([rows, kv_heads, head_dim]). Returns the rotated q [rows, q_heads,
    head_dim]. With square_sums, x is a deferred norm (linear_add_deferred_norm) that the projection
    finishes."""
    rows = x.shape[0]
    if rows <= MAX_BLOCK_ROWS:
        return extension().linear_qk_norm_rope_store(x, qkv_weight, q_norm_weight, k_norm_weight, rope_cos_sin,
                                                     positions_start, k_dst, v_dst, dst_start, eps, square_sums, eps)
    head_dim, kv_size = k_dst.shape[-1], k_dst.shape[-2] * k_dst.shape[-1]
    qkv = _projection(x, qkv_weight, square_sums, eps)
    q, k, v = (part.view(rows, -1, head_dim)
               for part in qkv.split([qkv_weight.shape[0] - 2 * kv_size, kv_size, kv_size], -1))
    start, dst = int(positions_start.item()), int(dst_start.item())
    cos_sin = rope_cos_sin[start:start + rows]
    k_dst[dst:dst + rows] = reference_rope(reference_rms_norm(k, k_norm_weight, eps), cos_sin)
    v_dst[dst:dst + rows] = v
    return reference_rope(reference_rms_norm(q, q_norm_weight, eps), cos_sin)


def attention(q, k_cache, v_cache, cache_len, k_block, v_block, causal: bool, scale: float):
    """Attention of a block over the cache rows [0, cache_len) plus the block's own keys (see kernels.h)."""
    rows = q.shape[0]
    if rows <= MAX_BLOCK_ROWS:
        return extension().attention(q, k_cache, v_cache, cache_len, k_block, v_block, causal, scale)
    if not causal:
        raise OrthrusError(f"a bidirectional block has at most {MAX_BLOCK_ROWS} rows, got {rows}")
    start = int(cache_len.item())
    keys, values = k_cache[:start + rows], v_cache[:start + rows]
    visible = torch.ones(rows, start + rows, dtype=torch.bool, device=q.device).tril(diagonal=start)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=visible, scale=scale,
        enable_gqa=True)
    return out.transpose(0, 1)


def accept(drafts, targets, cache_len, emitted, next_anchor) -> None:
    extension().accept(drafts, targets, cache_len, emitted, next_anchor)
