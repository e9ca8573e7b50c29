"""Latent attention: non-causal multi-head attention over latent tokens, with key padding.

``latent_attention(q, k, v, mask=None)`` computes, per batch element and head,

    out = softmax(q k^T / sqrt(D) + log(mask)) v

with ``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]`` and ``mask [B, Lk]`` bool (True = attend).
Self-attention has Lq = Lk; cross-attention to condition tokens has any Lk. A query row
whose keys are all masked (a batch element without any real key) returns zeros, not NaN,
and passes zero gradients. Differentiable in q, k and v.

Backends, in order of preference: ``triton`` (``kernels/latent_attention.py``, flash-style
forward and backward; CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests; head dims
16/32/64/128; fp32/bf16/fp16), ``torch`` (``F.scaled_dot_product_attention``; any head dim,
float64 too), ``xformers`` (``memory_efficient_attention``, when importable and on CUDA).
The Triton kernels' dtypes and head dims, and the input checks, are in
``latent_attention_layout.py`` (shared with the kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from d2nwg.backends import Backend, select, triton_reason
from d2nwg.errors import ConfigError

# The kernels' dtypes and head dims, and the checks, live in d2nwg/ops/latent_attention_layout.py,
# which the Triton kernels import too; importable from here.
from d2nwg.ops.latent_attention_layout import (  # noqa: F401
    DTYPES,
    TRITON_HEAD_DIMS,
    check_bwd_launch,
    check_launch,
)
from d2nwg.ops.latent_attention_layout import check_inputs as _check


# ----------------------------------------------------------------------------------------
# Reference (PyTorch, float64-capable): the oracle.
# ----------------------------------------------------------------------------------------
def _safe_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask with fully masked rows opened up, [B] 'has any key'); the caller zeroes those rows."""
    has_key = mask.any(-1)
    return mask | ~has_key[:, None], has_key


def _drop_masked(k: torch.Tensor, v: torch.Tensor, safe: torch.Tensor):
    """k and v with masked-out keys zeroed. A masked key takes no part, whatever it holds: a
    NaN there would otherwise leak into every output (0 * NaN, NaN + -inf), where the Triton
    kernel never reads it. So NaN inputs give the same result on every backend."""
    drop = ~safe[:, None, :, None]
    return k.masked_fill(drop, 0), v.masked_fill(drop, 0)


def _zero_keyless(out: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
    """Rows of batch elements without any key are zeros (not NaN * 0)."""
    return torch.where(
        has_key[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device)
    )


def latent_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mask: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Plain PyTorch attention in the inputs' dtype (pass float64 for an exact oracle)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is None:
        return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(-1), v)
    safe, has_key = _safe_mask(mask)
    k, v = _drop_masked(k, v, safe)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~safe[:, None, None, :], float("-inf"))
    out = torch.matmul(s.softmax(-1), v)
    return _zero_keyless(out, has_key)


# ----------------------------------------------------------------------------------------
# Backends.
# ----------------------------------------------------------------------------------------
def _torch_sdpa(q, k, v, mask=None, scale=None) -> torch.Tensor:
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    safe, has_key = _safe_mask(mask)
    k, v = _drop_masked(k, v, safe)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None, None, :], scale=scale)
    return _zero_keyless(out, has_key)


# Triton (kernels/latent_attention.py): the forward and backward launchers are torch.library
# custom ops, the forward's autograd formula calls the backward op. torch.compile (forward and
# AOT-traced backward) then sees opaque ops with fake impls, not the launchers (which read
# strides and launch kernels; under TRITON_INTERPRET=1 the kernels are Python). Outputs are
# laid out [B, L, H, D] in memory, so that the caller's transpose(1, 2).reshape is free.
@torch.library.custom_op(
    "d2nwg::attention_fwd_triton",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float sm_scale) -> (Tensor, Tensor)",
)
def _attention_fwd_op(q, k, v, mask, sm_scale):
    from d2nwg.kernels.latent_attention import attention_fwd

    return attention_fwd(
        q, k, v, mask, sm_scale
    )  # checks its inputs  # out, base-2 log-sum-exp [B, H, Lq] fp32


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, mask, sm_scale):
    B, H, LQ, D = q.shape
    return (q.new_empty(B, LQ, H, D).transpose(1, 2), q.new_empty(B, H, LQ, dtype=torch.float32))


@torch.library.custom_op(
    "d2nwg::attention_bwd_triton",
    mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
    "Tensor? mask, float sm_scale) -> (Tensor, Tensor, Tensor)",
)
def _attention_bwd_op(do, q, k, v, o, lse, mask, sm_scale):
    from d2nwg.kernels.latent_attention import attention_bwd

    return attention_bwd(do, q, k, v, o, lse, mask, sm_scale)  # dq, dk, dv; checks its inputs


@_attention_bwd_op.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, mask, sm_scale):
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    return (
        q.new_empty(B, LQ, H, D).transpose(1, 2),
        k.new_empty(B, LK, H, D).transpose(1, 2),
        v.new_empty(B, LK, H, D).transpose(1, 2),
    )


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, mask)
    ctx.sm_scale = sm_scale


def _attention_backward(ctx, do, dlse):  # lse is an internal output: its gradient is unused
    q, k, v, o, lse, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.d2nwg.attention_bwd_triton.default(
        do, q, k, v, o, lse, mask, ctx.sm_scale
    )
    return dq, dk, dv, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _triton(q, k, v, mask=None, scale=None) -> torch.Tensor:
    sm_scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.ops.d2nwg.attention_fwd_triton.default(q, k, v, mask, sm_scale)[0]


def _xformers(q, k, v, mask=None, scale=None) -> torch.Tensor:
    import xformers.ops as xops

    B, H, LQ, D = q.shape
    LK = k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # xformers wants [B, L, H, D]
    bias = None
    has_key = None
    if mask is not None:
        safe, has_key = _safe_mask(mask)
        k, v = _drop_masked(k, v, safe)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        # The additive bias must be allocated with its last dim padded to a multiple of 8.
        pad = (LK + 7) // 8 * 8
        storage = torch.zeros(B, H, LQ, pad, dtype=q.dtype, device=q.device)
        bias = storage[..., :LK]
        bias.masked_fill_(~safe[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(qt, kt, vt, attn_bias=bias, scale=scale).transpose(1, 2)
    if has_key is not None:
        out = _zero_keyless(out, has_key)
    return out


def _torch_why_not(q, k, v, mask=None, scale=None) -> str | None:
    return None


def _triton_why_not(q, k, v, mask=None, scale=None) -> str | None:
    reason = triton_reason([q, k, v])
    if reason is not None:
        return reason
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {TRITON_HEAD_DIMS}"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not one of {DTYPES}"
    return None


def _xformers_why_not(q, k, v, mask=None, scale=None) -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising anything else
        return f"xformers is not importable ({type(exc).__name__}: {exc})"
    if q.device.type != "cuda":
        return f"xformers needs CUDA tensors, got {q.device.type}"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not one of {DTYPES}"
    return None


LATENT_ATTENTION_BACKENDS = (
    Backend("triton", _triton, _triton_why_not),
    Backend("torch", _torch_sdpa, _torch_why_not),
    Backend("xformers", _xformers, _xformers_why_not),
)


# ----------------------------------------------------------------------------------------
# The public function (the checks: d2nwg/ops/latent_attention_layout.py).
# ----------------------------------------------------------------------------------------
def latent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention ``softmax(q k^T * scale) v`` with an optional key-padding mask.

    Args:
        q: queries ``[B, H, Lq, D]``.
        k, v: keys and values ``[B, H, Lk, D]`` (same dtype and device as q).
        mask: ``[B, Lk]`` bool, True where a key may be attended; None attends to all.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: force ``"triton"``, ``"torch"`` or ``"xformers"`` (else ``D2NWG_BACKEND``
            or the first that can run: triton on CUDA, torch otherwise).

    Returns:
        ``[B, H, Lq, D]`` in the dtype of q. Rows without any attended key are zeros.
    """
    _check(q, k, v, mask)
    if scale is not None and (
        isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale))
    ):
        raise ConfigError(f"scale must be a finite float or None, got {scale!r}")
    impl = select("latent_attention", LATENT_ATTENTION_BACKENDS, q, k, v, mask, backend=backend)
    return impl.run(q, k, v, mask, scale)
