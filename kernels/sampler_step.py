"""Triton kernel of the fused sampler step (reference: d2nwg/ops/sampler_step_op.py; table
columns and checks: d2nwg/ops/sampler_step_layout.py).

One program handles a tile of BLOCK_B samples x BLOCK_N elements (one row segment of 1024 for
large samples, several short rows otherwise): it reads the step index from device memory,
loads its samples' coefficient rows, then streams x, the model output (both halves when
guided), noise and the previous x0 (and the one before it) once and writes x (and the history)
once.
Fixed block size, no autotuning; runs under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d2nwg.backends import launch_device
from d2nwg.ops.sampler_step_layout import COLUMNS
from d2nwg.ops.sampler_step_layout import check_step as _check

BLOCK = 1024  # elements per program on a GPU (BLOCK_B rows x BLOCK_N columns)
NUM_WARPS = 4
# Under TRITON_INTERPRET=1 (CPU) every program and every op costs Python time whatever its
# size: one program covers up to this many elements instead.
INTERPRET_BLOCK = 65536


@triton.jit
def _sampler_step_kernel(
    x_ptr,
    out_ptr,
    tab_ptr,
    step_ptr,
    z_ptr,
    prev_ptr,
    prev2_ptr,
    B,
    N,
    n_col_blocks,
    num_steps,
    stride_ts,
    stride_tb,
    GUIDED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_PREV2: tl.constexpr,  # only with HAS_PREV
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    # The table's columns (d2nwg.ops.sampler_step_op.COLUMNS, csrc/sampler_step_layout.h).
    COL_G: tl.constexpr,
    COL_AX: tl.constexpr,
    COL_AO: tl.constexpr,
    COL_EX: tl.constexpr,
    COL_EO: tl.constexpr,
    COL_CX: tl.constexpr,
    COL_C0: tl.constexpr,
    COL_CE: tl.constexpr,
    COL_CP: tl.constexpr,
    COL_CZ: tl.constexpr,
    COL_CP2: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid // n_col_blocks
    cb = pid % n_col_blocks
    acc_t = ACC  # float32, or float64 for float64 x
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)  # samples of this tile
    # int64 offsets: B * N (and N alone) may exceed 2^31 - 1 while B and N each fit in int32.
    cols = cb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    # The step index lives in device memory (graph replays read the current value); each
    # row's coefficients come from table[s] (shared, stride_tb = 0) or table[s, b].
    s = tl.load(step_ptr).to(tl.int64)
    s = tl.minimum(tl.maximum(s, 0), num_steps - 1)
    crow = tab_ptr + s * stride_ts + rows.to(tl.int64) * stride_tb  # [BLOCK_B] pointers
    c_ax = tl.load(crow + COL_AX, mask=row_ok, other=0.0).to(acc_t)[:, None]
    c_ao = tl.load(crow + COL_AO, mask=row_ok, other=0.0).to(acc_t)[:, None]
    c_ex = tl.load(crow + COL_EX, mask=row_ok, other=0.0).to(acc_t)[:, None]
    c_eo = tl.load(crow + COL_EO, mask=row_ok, other=0.0).to(acc_t)[:, None]
    c_cx = tl.load(crow + COL_CX, mask=row_ok, other=0.0).to(acc_t)[:, None]
    c_c0 = tl.load(crow + COL_C0, mask=row_ok, other=0.0).to(acc_t)[:, None]
    c_ce = tl.load(crow + COL_CE, mask=row_ok, other=0.0).to(acc_t)[:, None]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if GUIDED:
        g = tl.load(crow + COL_G, mask=row_ok, other=0.0).to(acc_t)[:, None]
        m = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_t)
        u_offs = (rows.to(tl.int64) + B)[:, None] * N + cols[None, :]  # row B + b: uncond
        u = tl.load(out_ptr + u_offs, mask=mask, other=0.0).to(acc_t)
        o = u + g * (m - u)  # classifier-free guidance
    else:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_t)
    x0 = c_ax * x + c_ao * o  # prediction -> data
    eps = c_ex * x + c_eo * o  # prediction -> noise
    nxt = c_cx * x + c_c0 * x0 + c_ce * eps  # the sampler's update
    if HAS_PREV:
        c_cp = tl.load(crow + COL_CP, mask=row_ok, other=0.0).to(acc_t)[:, None]
        prev_raw = tl.load(prev_ptr + offs, mask=mask, other=0.0)
        nxt = nxt + c_cp * prev_raw.to(acc_t)
        if HAS_PREV2:
            c_cp2 = tl.load(crow + COL_CP2, mask=row_ok, other=0.0).to(acc_t)[:, None]
            prev2 = tl.load(prev2_ptr + offs, mask=mask, other=0.0).to(acc_t)
            nxt = nxt + c_cp2 * prev2
            tl.store(prev2_ptr + offs, prev_raw, mask=mask)  # the history moves back one step
        tl.store(prev_ptr + offs, x0.to(prev_ptr.dtype.element_ty), mask=mask)
    if HAS_NOISE:
        c_cz = tl.load(crow + COL_CZ, mask=row_ok, other=0.0).to(acc_t)[:, None]
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(acc_t)
        nxt = nxt + c_cz * z
    tl.store(x_ptr + offs, nxt.to(x_ptr.dtype.element_ty), mask=mask)


def tile(B: int, N: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_N): BLOCK elements per program, several short rows per program."""
    total = INTERPRET_BLOCK if interpret else BLOCK
    block_n = min(triton.next_power_of_2(max(N, 1)), total)
    block_b = min(triton.next_power_of_2(max(B, 1)), total // block_n)
    return max(block_b, 1), block_n


def sampler_step_triton(
    x: torch.Tensor,
    model_out: torch.Tensor,
    table: torch.Tensor,
    step: torch.Tensor,
    noise: torch.Tensor | None,
    prev_x0: torch.Tensor | None,
    guided: bool,
    prev2_x0: torch.Tensor | None = None,
) -> None:
    """Launch on contiguous inputs (see d2nwg.ops.sampler_step_op.sampler_step_). Reachable
    directly and as torch.ops.d2nwg.sampler_step_triton_, so it checks every shape, dtype,
    device and stride it relies on (the step index is clamped in the kernel)."""
    _check(x, model_out, table, step, noise, prev_x0, guided, prev2_x0, launch=True)
    B, N = x.shape
    if B == 0 or N == 0:
        return
    block_b, block_n = tile(B, N, x.device.type == "cpu")
    n_col_blocks = triton.cdiv(N, block_n)
    stride_tb = table.shape[2] if table.dim() == 3 else 0
    grid = (triton.cdiv(B, block_b) * n_col_blocks,)
    with launch_device(x):  # Triton launches on the current device, not the tensors'
        _sampler_step_kernel[grid](
            x,
            model_out,
            table,
            step,
            noise if noise is not None else x,
            prev_x0 if prev_x0 is not None else x,
            prev2_x0 if prev2_x0 is not None else x,
            B,
            N,
            n_col_blocks,
            table.shape[0],
            table.stride(0),
            stride_tb,
            GUIDED=bool(guided),
            HAS_NOISE=noise is not None,
            HAS_PREV=prev_x0 is not None,
            HAS_PREV2=prev2_x0 is not None,
            ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
            BLOCK_B=block_b,
            BLOCK_N=block_n,
            num_warps=NUM_WARPS,
            **{f"COL_{name}": j for j, name in enumerate(COLUMNS)},
        )
