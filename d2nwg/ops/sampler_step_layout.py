"""What the fused sampler step's Python side (:mod:`d2nwg.ops.sampler_step_op`) and its Triton
kernel (``kernels/sampler_step.py``) share: the columns of a coefficient table row, the dtypes,
and the input checks (of a call, and of a kernel launch). Imports neither of them, so that the
kernel need not import the op module back.
"""

from __future__ import annotations

import torch

from d2nwg.errors import DeviceError, DTypeError, ShapeError, shape_of

# Columns of a coefficient table row: the one definition for Python and Triton (the kernel
# gets them as constexprs COL_<name>). csrc/sampler_step_layout.h holds the same for C++ and
# CUDA; tests/test_sampler_step.py checks that the two agree.
# CP2 (the weight of the second history buffer) came last, so the older columns kept their
# indices.
COLUMNS = ("G", "AX", "AO", "EX", "EO", "CX", "C0", "CE", "CP", "CZ", "CP2")
G, AX, AO, EX, EO, CX, C0, CE, CP, CZ, CP2 = range(len(COLUMNS))
K = len(COLUMNS)
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TABLE_DTYPES = (torch.float32, torch.float64)
STEP_DTYPES = (torch.int64,)


def check_step(
    x, model_out, table, step, noise, prev_x0, guided, prev2_x0=None, *, launch: bool = False
) -> None:
    """Validate the inputs of one step. ``launch``: the checks of a kernel launch (the Triton
    op is reachable directly): every tensor contiguous, no host read of ``step`` (kernels
    clamp it)."""
    tensors = dict(
        x=x,
        model_out=model_out,
        table=table,
        step=step,
        noise=noise,
        prev_x0=prev_x0,
        prev2_x0=prev2_x0,
    )
    for name, t in tensors.items():
        if t is None and name in ("noise", "prev_x0", "prev2_x0"):
            continue
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise DTypeError(f"{name} has layout {t.layout}; only dense tensors are supported")
    if not isinstance(guided, bool):
        raise DTypeError(f"guided must be a bool, got {type(guided).__name__}")
    if x.dim() != 2:
        raise ShapeError(f"x must be a [B, N] tensor, got {shape_of(x)}")
    B, N = x.shape
    if x.dtype not in X_DTYPES:
        raise DTypeError(f"x has dtype {x.dtype}; expected one of {X_DTYPES}")
    if not x.is_contiguous():
        raise ShapeError("x must be contiguous (it is updated in place)")
    want = (2 * B, N) if guided else (B, N)
    if tuple(model_out.shape) != want:
        raise ShapeError(
            f"model_out has shape {tuple(model_out.shape)}, expected {want}"
            + (" (cond rows, then uncond rows)" if guided else "")
        )
    if model_out.dtype != x.dtype:
        raise DTypeError(f"model_out has dtype {model_out.dtype}, x has {x.dtype}")
    if table.dtype not in TABLE_DTYPES:
        raise DTypeError(f"table has dtype {table.dtype}; expected one of {TABLE_DTYPES}")
    if not (table.dim() == 2 and table.shape[1] == K) and not (
        table.dim() == 3 and table.shape[1] == B and table.shape[2] == K
    ):
        raise ShapeError(
            f"table has shape {tuple(table.shape)}, expected [S, {K}] or [S, {B}, {K}]"
        )
    if table.shape[0] == 0:
        raise ShapeError("table has no steps")
    if step.dtype not in STEP_DTYPES:
        raise DTypeError(f"step must be a one-element int64 tensor, got dtype {step.dtype}")
    if step.numel() != 1:
        raise ShapeError(f"step must be a one-element int64 tensor, got {step.numel()} elements")
    for name, t in (("noise", noise), ("prev_x0", prev_x0), ("prev2_x0", prev2_x0)):
        if t is None:
            continue
        if tuple(t.shape) != (B, N):
            raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected {(B, N)}")
        if t.dtype != x.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype}, x has {x.dtype}")
    if prev2_x0 is not None:
        if prev_x0 is None:
            raise ShapeError("prev2_x0 needs prev_x0 (it receives prev_x0's values)")
        same = prev2_x0 is prev_x0 or (
            not torch.compiler.is_compiling()  # (a fake tensor has no data pointer)
            and prev2_x0.numel() > 0
            and prev2_x0.device.type != "meta"
            and prev2_x0.data_ptr() == prev_x0.data_ptr()
        )
        if same:
            raise ShapeError("prev2_x0 and prev_x0 must be two different buffers")
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise DeviceError(f"{name} is on {t.device}, x on {x.device}")
    if launch:  # (x is contiguous by now, and a one-element step always is)
        for name, t in tensors.items():
            if t is not None and not t.is_contiguous():
                raise ShapeError(f"{name} must be contiguous")
        return
    if step.device.type == "cpu" and torch.compiler.is_compiling():
        # int(step) would break the graph; the check goes into the graph (a RuntimeError).
        torch._assert_async(
            ((step >= 0) & (step < table.shape[0])).all(),
            f"step is out of range for a table of {table.shape[0]} steps",
        )
    elif step.device.type == "cpu" and not 0 <= int(step.reshape(-1)[0]) < table.shape[0]:
        raise ShapeError(
            f"step {int(step.reshape(-1)[0])} is out of range for a table of {table.shape[0]} steps"
        )
