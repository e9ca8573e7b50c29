"""The fused, batched diffusion sampler step: one kernel per denoising step.

For sample ``b`` (row ``b`` of ``x`` viewed as ``[B, N]``) at step ``s`` (read from the device
tensor ``step``, so that a captured CUDA graph replays with the right coefficients), with the
coefficient row ``c = table[s]`` (shared, table ``[S, K]``) or ``c = table[s, b]`` (per
sample, table ``[S, B, K]``), every backend computes, elementwise and in this order:

    o    = u + c[G] * (m - u)        if guided: m = model_out[b] (cond), u = model_out[B + b]
         = model_out[b]              otherwise
    x0   = c[AX] * x + c[AO] * o     the prediction converted to data   (x_0-hat)
    eps  = c[EX] * x + c[EO] * o     the prediction converted to noise  (eps-hat)
    next = c[CX] * x + c[C0] * x0 + c[CE] * eps  [+ c[CP] * prev]  [+ c[CP2] * prev2]
                                                 [+ c[CZ] * noise]
    x     <- next                    (in place)
    prev2 <- prev                    (when a second history buffer is given: DPM-Solver++(3M),
    prev  <- x0                       UniPC; with one buffer, DPM-Solver++(2M): prev <- x0)

The bracketed terms are present only when ``prev_x0`` / ``prev2_x0`` / ``noise`` are given
(``prev2_x0`` only with ``prev_x0``: the two hold the data predictions of the last two steps,
newest first). Arithmetic runs in float32 (float64 for float64 ``x``); the result is rounded
once to ``x.dtype``. The samplers (DDPM, DDIM, DPM-Solver++(2M) and (3M), UniPC) differ only
in their tables, built by :mod:`d2nwg.sampling`. Files of this op: this one (reference,
dispatch, public functions), ``sampler_step_layout.py`` (the table's columns and the input
checks, shared with the kernel), ``kernels/sampler_step.py`` (Triton),
``csrc/sampler_step_cpu.cpp`` and ``csrc/sampler_step_cuda.cu`` (registered in
``csrc/registration.cpp``).
"""

from __future__ import annotations

import torch

from d2nwg import _ext
from d2nwg.backends import Backend, compiled_reason, select, triton_reason
from d2nwg.errors import DTypeError, ShapeError

# The table's columns (one definition for Python and Triton), the dtypes and the checks live in
# d2nwg/ops/sampler_step_layout.py, which the Triton kernel imports too; importable from here.
from d2nwg.ops.sampler_step_layout import (  # noqa: F401
    AO,
    AX,
    C0,
    CE,
    COLUMNS,
    CP,
    CP2,
    CX,
    CZ,
    EO,
    EX,
    STEP_DTYPES,
    TABLE_DTYPES,
    X_DTYPES,
    G,
    K,
)
from d2nwg.ops.sampler_step_layout import check_step as _check


# ----------------------------------------------------------------------------------------
# Reference (PyTorch): the oracle for every backend.
# ----------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes in for ``x`` of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sampler_step_ref(
    x: torch.Tensor, model_out: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
    noise: torch.Tensor | None = None, prev_x0: torch.Tensor | None = None, guided: bool = False,
    prev2_x0: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """In place on ``x`` [B, N] (and ``prev_x0``, ``prev2_x0``); see the module docstring.

    ``compute_dtype`` (tests only) overrides the float32/float64 arithmetic, e.g. to measure
    PyTorch's own error when it computes in bfloat16.
    """
    B = x.shape[0]
    acc = compute_dtype or acc_dtype(x.dtype)
    s = step.reshape(1).long().clamp(0, table.shape[0] - 1)
    row = table.index_select(0, s)[0].to(acc)  # [K] or [B, K]
    c = row.view(1, K).expand(B, K) if row.dim() == 1 else row  # [B, K]
    col = [c[:, j : j + 1] for j in range(K)]  # each [B, 1]
    xa = x.to(acc)
    if guided:
        m, u = model_out[:B].to(acc), model_out[B:].to(acc)
        o = u + col[G] * (m - u)
    else:
        o = model_out.to(acc)
    x0 = col[AX] * xa + col[AO] * o
    eps = col[EX] * xa + col[EO] * o
    nxt = col[CX] * xa + col[C0] * x0 + col[CE] * eps
    if prev_x0 is not None:
        nxt = nxt + col[CP] * prev_x0.to(acc)
    if prev2_x0 is not None:
        nxt = nxt + col[CP2] * prev2_x0.to(acc)
    if noise is not None:
        nxt = nxt + col[CZ] * noise.to(acc)
    x.copy_(nxt)
    if prev2_x0 is not None:
        prev2_x0.copy_(prev_x0)
    if prev_x0 is not None:
        prev_x0.copy_(x0)


# ----------------------------------------------------------------------------------------
# Compiled backends (csrc/): registered as torch.ops.d2nwg.sampler_step_.
# ----------------------------------------------------------------------------------------
def _compiled(x, model_out, table, step, noise, prev_x0, guided, prev2_x0=None) -> None:
    torch.ops.d2nwg.sampler_step_.default(
        x, model_out, table, step, noise, prev_x0, guided, prev2_x0
    )


# Triton (kernels/sampler_step.py), registered as torch.ops.d2nwg.sampler_step_triton_ with the
# compiled op's schema: torch.compile then sees an opaque in-place op instead of the launcher.
@torch.library.custom_op(
    "d2nwg::sampler_step_triton_",
    mutates_args=("x", "prev_x0", "prev2_x0"),
    schema="(Tensor(a!) x, Tensor model_out, Tensor table, Tensor step, "
    "Tensor? noise, Tensor(b!)? prev_x0, bool guided, Tensor(c!)? prev2_x0=None) -> ()",
)
def _triton_op(x, model_out, table, step, noise, prev_x0, guided, prev2_x0=None) -> None:
    from d2nwg.kernels.sampler_step import sampler_step_triton

    # (checks its inputs)
    sampler_step_triton(x, model_out, table, step, noise, prev_x0, guided, prev2_x0)


@_triton_op.register_fake
def _triton_fake(x, model_out, table, step, noise, prev_x0, guided, prev2_x0=None) -> None:
    return None


def _triton(x, model_out, table, step, noise, prev_x0, guided, prev2_x0=None) -> None:
    torch.ops.d2nwg.sampler_step_triton_.default(
        x, model_out, table, step, noise, prev_x0, guided, prev2_x0
    )


def _triton_why_not(x, *_) -> str | None:
    return triton_reason([x])


def _ref_reason(*_) -> None:
    return None


SAMPLER_STEP_BACKENDS = (
    Backend("cuda", _compiled, compiled_reason("cuda", "sampler_step_")),
    Backend("triton", _triton, _triton_why_not),
    Backend("cpp", _compiled, compiled_reason("cpu", "sampler_step_")),
    Backend("torch", sampler_step_ref, _ref_reason),
)

if _ext._C is not None and hasattr(torch.ops.d2nwg, "sampler_step_"):
    try:  # lets torch.compile trace through the in-place op (it returns nothing)

        @torch.library.register_fake("d2nwg::sampler_step_")
        def _fake(x, model_out, table, step, noise, prev_x0, guided, prev2_x0=None):
            return None
    except (RuntimeError, AttributeError):  # already registered (module reloaded) or old torch
        pass


# ----------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------
def sampler_step_(
    x: torch.Tensor,
    model_out: torch.Tensor,
    table: torch.Tensor,
    step: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    prev_x0: torch.Tensor | None = None,
    prev2_x0: torch.Tensor | None = None,
    guided: bool = False,
    backend: str | None = None,
    check: bool = True,
) -> torch.Tensor:
    """One fused sampler step, in place on ``x`` ``[B, N]``; returns ``x``.

    Args:
        x: the current sample x_t, ``[B, N]``, contiguous (float32/16, bfloat16, float64).
        model_out: the model's prediction, ``[B, N]``, or ``[2B, N]`` (cond rows, then uncond
            rows) when ``guided``; same dtype as ``x``.
        table: coefficients, ``[S, K]`` (shared) or ``[S, B, K]`` (per sample), float32 or
            float64, columns :data:`COLUMNS` (see the module docstring).
        step: one-element int64 tensor on ``x``'s device: the table row to use. On CUDA it is
            not range-checked (that would synchronize); kernels clamp it to ``[0, S)``.
        noise: standard normal noise ``[B, N]`` scaled by column CZ, or None.
        prev_x0: the previous data prediction ``[B, N]``, read (column CP) then overwritten
            with this step's x0 (DPM-Solver++(2M), (3M), UniPC); or None.
        prev2_x0: the data prediction before that ``[B, N]``, read (column CP2) then
            overwritten with ``prev_x0``'s values (DPM-Solver++(3M), UniPC); or None. Needs
            ``prev_x0``.
        guided: mix classifier-free guidance from the two halves of ``model_out``.
        backend: force "torch", "cpp", "cuda" or "triton" (else ``D2NWG_BACKEND`` / best).
        check: validate the inputs (the sampler loop validates once, then passes False).
    """
    if check and not isinstance(x, torch.Tensor):
        raise DTypeError(f"x must be a tensor, got {type(x).__name__}")
    if isinstance(noise, torch.Tensor) and noise.dim() != 2 and noise.numel() == x.numel():
        noise = noise.reshape(x.shape)
    if check:
        _check(x, model_out, table, step, noise, prev_x0, guided, prev2_x0)
        model_out = model_out.contiguous()
        table = table.contiguous()
        noise = noise.contiguous() if noise is not None else None
        for name, t in (("prev_x0", prev_x0), ("prev2_x0", prev2_x0)):
            if t is not None and not t.is_contiguous():
                raise ShapeError(f"{name} must be contiguous (it is updated in place)")
    if x.numel() == 0:
        return x
    args = (x, model_out, table, step, noise, prev_x0, guided, prev2_x0)
    select("sampler_step", SAMPLER_STEP_BACKENDS, *args, backend=backend).run(*args)
    return x


def sampler_step(
    x: torch.Tensor, model_out: torch.Tensor, table: torch.Tensor, step: torch.Tensor, **options
) -> torch.Tensor:
    """Out-of-place :func:`sampler_step_` (the same arguments and keywords): returns the next
    sample; ``prev_x0`` and ``prev2_x0`` are still updated in place when given."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"x must be a tensor, got {type(x).__name__}")
    out = x.clone(memory_format=torch.contiguous_format)
    return sampler_step_(out, model_out, table, step, **options)
