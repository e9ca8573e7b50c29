"""What latent attention's Python side (:mod:`d2nwg.ops.latent_attention_op`) and its Triton
kernels (``kernels/latent_attention.py``) share: the dtypes and head dims the kernels take, and
the input checks (of a call, and of a kernel launch). Imports neither of them, so that the
kernels need not import the op module back.
"""

from __future__ import annotations

import math

import torch

from d2nwg.errors import ConfigError, DeviceError, DTypeError, ShapeError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise DTypeError(f"{name} has layout {t.layout}; only dense tensors are supported")


def check_bwd_launch(do, q, k, v, o, lse, mask, sm_scale) -> None:
    """The checks of a Triton backward launch (see :func:`check_launch`)."""
    check_launch(q, k, v, mask, sm_scale)
    for name, t in (("do", do), ("o", o)):
        _check_tensor(name, t)
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ShapeError(
                f"{name} must be shaped, typed and placed like q {tuple(q.shape)} "
                f"{q.dtype} {q.device}, got {tuple(t.shape)} {t.dtype} {t.device}"
            )
    _check_tensor("lse", lse)
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
        raise ShapeError(
            f"lse must be float32 {tuple(q.shape[:3])} on {q.device}, got "
            f"{tuple(lse.shape)} {lse.dtype} {lse.device}"
        )


def check_launch(q, k, v, mask, sm_scale) -> None:
    """The checks of a Triton launch, which is reachable directly (d2nwg.kernels) and through
    torch.ops.d2nwg.attention_*_triton: everything the kernels index with."""
    check_inputs(q, k, v, mask)
    if q.device.type not in ("cpu", "cuda"):
        raise DeviceError(
            f"the Triton kernels run on CUDA (or CPU under the interpreter), got {q.device}"
        )
    if q.dtype not in DTYPES:
        raise DTypeError(f"the Triton kernels take {DTYPES}, got {q.dtype}")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ShapeError(f"the Triton kernels take head dims {TRITON_HEAD_DIMS}, got {q.shape[-1]}")
    if isinstance(sm_scale, bool) or not (
        isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)
    ):
        raise ConfigError(f"sm_scale must be a finite float, got {sm_scale!r}")


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ShapeError(f"{name} must have rank 4 [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES + (torch.float64,):
            raise DTypeError(
                f"{name} has dtype {t.dtype}; expected one of {DTYPES} "
                "(float64 on the torch backend)"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[0] != q.shape[0]:
            raise ShapeError(f"{name} has batch size {t.shape[0]} but q has {q.shape[0]}")
        if t.shape[1] != q.shape[1]:
            raise ShapeError(f"{name} has {t.shape[1]} heads but q has {q.shape[1]}")
        if t.shape[3] != q.shape[3]:
            raise ShapeError(f"{name} has head dim {t.shape[3]} but q has {q.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ShapeError(f"v has {v.shape[2]} keys (dim 2) but k has {k.shape[2]}")
    if q.shape[3] == 0:
        raise ShapeError("q has head dim 0")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise DTypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        _check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise DTypeError(f"mask has dtype {mask.dtype}; expected torch.bool (True = attend)")
        if tuple(mask.shape) != (k.shape[0], k.shape[2]):
            raise ShapeError(
                f"mask has shape {tuple(mask.shape)}; expected [B, Lk] = {[k.shape[0], k.shape[2]]}"
            )
        if mask.device != q.device:
            raise DeviceError(f"mask is on {mask.device} but q is on {q.device}")
