"""Flash-style latent attention in Triton (forward and backward), installed as
``d2nwg.kernels.latent_attention``.

Non-causal attention ``softmax(q k^T * scale) v`` over ``q [B, H, Lq, D]`` and
``k, v [B, H, Lk, D]`` with an optional key-padding mask ``[B, Lk]`` (nonzero = attend).

* Forward: one program per (query block, batch*head). Keys are streamed in blocks with an
  online softmax (running max ``m`` and sum ``l`` in base 2), so no ``[Lq, Lk]`` matrix is ever
  materialized. The per-row log-sum-exp (base 2, of the scaled scores) is saved for backward.
* Backward: ``delta = rowsum(dO * O)`` (preprocess), then one kernel that owns a key block and
  streams the queries (dK, dV), and one that owns a query block and streams the keys (dQ).
  Probabilities are recomputed from the saved log-sum-exp; no atomics.
* Any length: out-of-range rows and columns are masked. A fully masked query row (every key
  padded) returns zeros and gets zero gradients (its log-sum-exp is stored as +inf).
* Inputs may be strided (only the head dimension must be contiguous), fp32 / bf16 / fp16;
  all accumulation is fp32. fp32 inputs use IEEE fp32 dot products (no TF32) unless
  ``torch.backends.cuda.matmul.allow_tf32`` is set.

Under ``TRITON_INTERPRET=1`` block sizes are fixed (no autotuning); on a GPU a fixed choice per
head dimension is used (see ``_fwd_config`` / ``_bwd_config``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from d2nwg.backends import launch_device
from d2nwg.ops.latent_attention_layout import (  # DTYPES, HEAD_DIMS: what the kernels take
    DTYPES,  # noqa: F401
    check_bwd_launch,
    check_launch,
)
from d2nwg.ops.latent_attention_layout import TRITON_HEAD_DIMS as HEAD_DIMS  # noqa: F401

LOG2E = 1.4426950408889634


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32. UPCAST (interpreter + bf16 only): the Triton interpreter's
    bf16 ``tl.dot`` is wrong, so the (already bf16-rounded) operands are widened first, which
    gives the same products as a bf16 MMA with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _batch_head(H, LQ):
    """This program's batch b, head h and first LSE / DELTA entry row0 (grid axis 1 runs over
    batch * head), in int64: b * stride_b and pid * LQ pass 2^31 on large batches even when
    each stride fits in int32 (Triton would multiply in int32 and wrap)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return b, h, pid_bh.to(tl.int64) * LQ


@triton.jit
def _tiles(H, LQ, L, BLOCK: tl.constexpr, BLOCK_STREAM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The offsets of a program of the forward, dK/dV and dQ kernels. Grid axis 0 runs over
    the blocks of BLOCK rows (of L) that a program owns: queries, or keys for dK/dV. Returns b,
    h, row0 (see ``_batch_head``), the owned rows and which of them exist, then the row
    offsets of a streamed block (BLOCK_STREAM rows of the other side) and the head-dim offsets.
    The order of the operations is the one the kernels had inline: the compiled code follows it."""
    pid = tl.program_id(0)
    b, h, row0 = _batch_head(H, LQ)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_stream = tl.arange(0, BLOCK_STREAM)
    offs_d = tl.arange(0, HEAD_DIM)
    return b, h, row0, offs, offs < L, offs_stream, offs_d


@triton.jit
def _rows(X, b, h, stride, rows, offs_d):
    """Pointers to rows ``rows`` (all of the head dim) of head h of batch b of ``X``, whose
    (batch, head, row) strides are the tuple ``stride``."""
    return X + b * stride[0] + h * stride[1] + rows[:, None] * stride[2] + offs_d[None, :]


@triton.jit
def _store_rows(X, b, h, stride, rows, offs_d, x, ok):
    """Store the fp32 block ``x`` in X's dtype at rows ``rows`` of head h of batch b of ``X``,
    where ``ok``."""
    tl.store(_rows(X, b, h, stride, rows, offs_d), x.to(X.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _keys_ok(MASK, b, stride_maskb, cols, LK, HAS_MASK: tl.constexpr):
    """Which key columns ``cols`` exist and are attended (the key-padding mask of batch b)."""
    ok = cols < LK
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_maskb + cols, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def _load(ptrs, ok, ALL: tl.constexpr):
    """A [rows, HEAD_DIM] block: zeros where ``ok`` is False (never read), or no bounds checks
    when ALL rows are known to be there."""
    if ALL:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=ok[:, None], other=0.0)
    return x


# Parameters, one line per group as in flash-attention's Triton kernels (ruff would put each
# on a line of its own): tensors, then the (batch, head, row) strides of each [B, H, L, D]
# tensor as a tuple (Triton specializes each element as it does a scalar argument: 16-divisible
# or equal to 1), then sizes and scales, then constexprs.
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK,
    stride_q, stride_k, stride_v, stride_o,
    stride_maskb, H, LQ, LK, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FULL_N: tl.constexpr,
):  # fmt: skip
    b, h, row0, offs_m, row_ok, offs_n, offs_d = _tiles(H, LQ, LQ, BLOCK_M, BLOCK_N, HEAD_DIM)
    q = _load(_rows(Q, b, h, stride_q, offs_m, offs_d), row_ok, False)
    k_base = K + b * stride_k[0] + h * stride_k[1] + offs_d[None, :]
    v_base = V + b * stride_v[0] + h * stride_v[1] + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        col_ok = _keys_ok(MASK, b, stride_maskb, cols, LK, HAS_MASK)
        k = _load(k_base + cols[:, None] * stride_k[2], col_ok, FULL_N)
        v = _load(v_base + cols[:, None] * stride_v[2], col_ok, FULL_N)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        if not FULL_N:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far masked
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    _store_rows(O, b, h, stride_o, offs_m, offs_d, out, row_ok)
    tl.store(LSE + row0 + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, stride_o, stride_do, H, LQ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, h, row0 = _batch_head(H, LQ)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    o = _load(_rows(O, b, h, stride_o, offs_m, offs_d), row_ok, False)
    o = o.to(tl.float32)
    do = _load(_rows(DO, b, h, stride_do, offs_m, offs_d), row_ok, False)
    tl.store(DELTA + row0 + offs_m, tl.sum(o * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK,
    stride_q, stride_k, stride_v, stride_do, stride_dk, stride_dv,
    stride_maskb, H, LQ, LK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FULL_M: tl.constexpr,
):  # fmt: skip
    b, h, row0, offs_n, in_range, offs_m, offs_d = _tiles(H, LQ, LK, BLOCK_N, BLOCK_M, HEAD_DIM)
    col_ok = _keys_ok(MASK, b, stride_maskb, offs_n, LK, HAS_MASK)

    k = _load(_rows(K, b, h, stride_k, offs_n, offs_d), col_ok, False)
    v = _load(_rows(V, b, h, stride_v, offs_n, offs_d), col_ok, False)
    q_base = Q + b * stride_q[0] + h * stride_q[1] + offs_d[None, :]
    do_base = DO + b * stride_do[0] + h * stride_do[1] + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, LQ, BLOCK_M):
        rows = start_m + offs_m
        # FULL_M (LQ % BLOCK_M == 0): no bounds checks; else out-of-range rows get q = dO = 0
        # and lse = +inf, so p = 0 there.
        row_ok = rows < LQ
        q = _load(q_base + rows[:, None] * stride_q[2], row_ok, FULL_M)
        do = _load(do_base + rows[:, None] * stride_do[2], row_ok, FULL_M)
        if FULL_M:
            lse = tl.load(LSE + row0 + rows)
            delta = tl.load(DELTA + row0 + rows)
        else:
            lse = tl.load(LSE + row0 + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + row0 + rows, mask=row_ok, other=0.0)
        s_t = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale  # [N, M]
        p_t = tl.exp2(s_t - lse[None, :])
        if HAS_MASK:  # out-of-range keys are never stored; masked keys must get zero grads
            p_t = tl.where(col_ok[:, None], p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)
    _store_rows(DK, b, h, stride_dk, offs_n, offs_d, dk * sm_scale, in_range)
    _store_rows(DV, b, h, stride_dv, offs_n, offs_d, dv, in_range)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, MASK,
    stride_q, stride_k, stride_v, stride_do, stride_dq,
    stride_maskb, H, LQ, LK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FULL_N: tl.constexpr,
):  # fmt: skip
    b, h, row0, offs_m, row_ok, offs_n, offs_d = _tiles(H, LQ, LQ, BLOCK_M, BLOCK_N, HEAD_DIM)
    q = _load(_rows(Q, b, h, stride_q, offs_m, offs_d), row_ok, False)
    do = _load(_rows(DO, b, h, stride_do, offs_m, offs_d), row_ok, False)
    lse = tl.load(LSE + row0 + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row0 + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * stride_k[0] + h * stride_k[1] + offs_d[None, :]
    v_base = V + b * stride_v[0] + h * stride_v[1] + offs_d[None, :]
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        col_ok = _keys_ok(MASK, b, stride_maskb, cols, LK, HAS_MASK)
        k = _load(k_base + cols[:, None] * stride_k[2], col_ok, FULL_N)
        v = _load(v_base + cols[:, None] * stride_v[2], col_ok, FULL_N)
        # out-of-range rows: lse = +inf, p = 0
        p = tl.exp2(_dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale - lse[:, None])
        if not FULL_N:
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    _store_rows(DQ, b, h, stride_dq, offs_m, offs_d, dq * sm_scale, row_ok)


# ----------------------------------------------------------------------------------------
# Launchers: block sizes, strides, grids.
# ----------------------------------------------------------------------------------------
def _fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for the forward kernel."""
    if _interpreted():
        return dict(BLOCK_M=32, BLOCK_N=32)
    if dtype == torch.float32:  # fp32 tiles are twice as big in shared memory; 8 warps from
        # head dim 64 on keep exact-fp32 dots out of local memory (ptxas spilled 15 KB/thread at 4)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4 if head_dim <= 32 else 8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _bwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for the two backward kernels."""
    if _interpreted():
        return dict(BLOCK_M=32, BLOCK_N=32)
    if dtype == torch.float32:  # 8 warps from head dim 64 on: no register spills (see above)
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4 if head_dim <= 32 else 8, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 unless TF32 is allowed; the default for 16-bit."""
    if dtype != torch.float32:
        return "tf32"  # Triton's default; it only affects fp32 operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not _interpreted() else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreted()


MAX_GRID_Y = 65535  # CUDA's limit on grid dim 1, where (batch, head) pairs go


def _batch_slices(B: int, H: int, limit: int | None = None):
    """Batch slices with at most ``limit`` (batch, head) pairs each (one launch per slice)."""
    per = max(1, (limit or MAX_GRID_Y) // H)
    return [slice(b0, min(B, b0 + per)) for b0 in range(0, B, per)]


def _strides(*tensors: torch.Tensor) -> list[tuple[int, int, int]]:
    """The (batch, head, row) strides of each [B, H, L, D] tensor: the kernels' stride tuples."""
    return [t.stride()[:3] for t in tensors]


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor):
    if mask is None:
        return fallback, 0, False
    m = mask.contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return m, m.stride(0), True


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, Lq, D]`` (laid out as [B, Lq, H, D] in memory) and base-2 LSE [B, H, Lq]."""
    check_launch(q, k, v, mask, sm_scale)
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    # [B, Lq, H, D] memory: the caller's transpose(1, 2).reshape(B, Lq, H*D) is then free.
    o = torch.empty(B, LQ, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, LQ, dtype=torch.float32, device=q.device)
    if B * H * LQ == 0:
        return o, lse
    if LK == 0:
        o.zero_()
        lse.fill_(float("inf"))
        return o, lse
    m, stride_mb, has_mask = _mask_arg(mask, q)
    cfg = _fwd_config(D, q.dtype)
    with launch_device(q):
        for sl in _batch_slices(B, H):
            Bs = sl.stop - sl.start
            qs, ks, vs, os_ = q[sl], k[sl], v[sl], o[sl]
            _attn_fwd_kernel[(triton.cdiv(LQ, cfg["BLOCK_M"]), Bs * H)](
                qs,
                ks,
                vs,
                os_,
                lse[sl],
                m[sl] if has_mask else qs,
                *_strides(qs, ks, vs, os_),
                stride_mb,
                H,
                LQ,
                LK,
                sm_scale * LOG2E,
                HEAD_DIM=D,
                HAS_MASK=has_mask,
                PRECISION=_precision(q.dtype),
                UPCAST=_upcast(q.dtype),
                FULL_N=(not has_mask and LK % cfg["BLOCK_N"] == 0),
                **cfg,
            )
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``dq, dk, dv`` from the output gradient and the saved LSE."""
    check_bwd_launch(do, q, k, v, o, lse, mask, sm_scale)
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    q, k, v, o, do = (_lastdim_contiguous(t) for t in (q, k, v, o, do))
    dq = torch.empty(B, LQ, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    dk = torch.empty(B, LK, H, D, dtype=k.dtype, device=k.device).transpose(1, 2)
    dv = torch.empty(B, LK, H, D, dtype=v.dtype, device=v.device).transpose(1, 2)
    if B * H == 0 or LQ == 0 or LK == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    m, stride_mb, has_mask = _mask_arg(mask, q)
    cfg = _bwd_config(D, q.dtype)
    common = (stride_mb, H, LQ, LK, sm_scale * LOG2E, sm_scale)
    options = dict(  # the constexprs (and launch options) of both gradient kernels
        HEAD_DIM=D, HAS_MASK=has_mask, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), **cfg
    )
    delta = torch.empty(B, H, LQ, dtype=torch.float32, device=q.device)
    pre_block = 32 if _interpreted() else 64
    with launch_device(q):
        for sl in _batch_slices(B, H):
            BH = (sl.stop - sl.start) * H
            qs, ks, vs, os_, dos = q[sl], k[sl], v[sl], o[sl], do[sl]
            dqs, dks, dvs, lses, deltas = dq[sl], dk[sl], dv[sl], lse[sl], delta[sl]
            ms = m[sl] if has_mask else qs
            _attn_bwd_preprocess[(triton.cdiv(LQ, pre_block), BH)](
                os_,
                dos,
                deltas,
                *_strides(os_, dos),
                H,
                LQ,
                HEAD_DIM=D,
                BLOCK_M=pre_block,
            )
            _attn_bwd_dkdv_kernel[(triton.cdiv(LK, cfg["BLOCK_N"]), BH)](
                qs,
                ks,
                vs,
                dos,
                dks,
                dvs,
                lses,
                deltas,
                ms,
                *_strides(qs, ks, vs, dos, dks, dvs),
                *common,
                FULL_M=(LQ % cfg["BLOCK_M"] == 0),
                **options,
            )
            _attn_bwd_dq_kernel[(triton.cdiv(LQ, cfg["BLOCK_M"]), BH)](
                qs,
                ks,
                vs,
                dos,
                dqs,
                lses,
                deltas,
                ms,
                *_strides(qs, ks, vs, dos, dqs),
                *common,
                FULL_N=(not has_mask and LK % cfg["BLOCK_N"] == 0),
                **options,
            )
    return dq, dk, dv
