"""Fused chunk tokenization: many parameter tensors of many models <-> one token tensor.

A :class:`ChunkPlan` says where each of S parameter tensors ("segments") lives in the flat
``[T * C]`` token row of one model: segment s fills ``numel[s]`` elements from ``offset[s]``
and owns ``span[s] >= numel[s]`` elements, the rest being zero padding. The spans tile the
row exactly, so tokenization writes every token element exactly once.

Arithmetic (identical in every backend, so they agree to the last bit):

    tokenize:    y = fp32((x - shift) * rscale)          in float64, then cast to the token dtype
    detokenize:  x = fp32(y * scale + unshift)          in float64, then cast to the weight dtype
                 (no fused multiply-add; a float64 destination skips the fp32 step)

``rscale = 1 / scale`` is computed once in float64; a zero shift is stored as +0.0 and ``unshift``
is the shift with 0 spelled -0.0, so that subtracting and adding back keep the sign of zero
weights. Layers without normalization use shift
0, scale 1, for which both directions are exact. Files of this op: this one (reference, checks,
dispatch, public functions), ``tokenize_layout.py`` (:class:`ChunkPlan`, shared with the
kernels), ``kernels/tokenize.py`` (Triton), ``csrc/tokenize_cpu.cpp`` and
``csrc/tokenize_cuda.cu`` (C++ and CUDA, registered in ``csrc/registration.cpp``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from d2nwg import _ext
from d2nwg.backends import Backend, compiled_reason, select, triton_reason
from d2nwg.errors import ConfigError, DeviceError, DTypeError, ShapeError

# The plan lives in d2nwg/ops/tokenize_layout.py, which the Triton kernels import too.
from d2nwg.ops.tokenize_layout import MAX_ELEMENTS, ChunkPlan  # noqa: F401

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------
# Reference (PyTorch): the oracle for every backend.
# ----------------------------------------------------------------------------------------
def _round_to(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype through float32 (the rounding every backend uses)."""
    return x64 if dtype == torch.float64 else x64.float().to(dtype)


def tokenize_ref(out: torch.Tensor, sources: Sequence[torch.Tensor], plan: ChunkPlan) -> None:
    """Fill ``out`` [N, T*C] from ``sources`` (N*S tensors, model-major)."""
    S = plan.num_segments
    out.zero_()
    for i, src in enumerate(sources):
        n, s = divmod(i, S)
        x = src.reshape(-1).double()
        y = (x - plan.shift[s]) * plan.rscale[s]
        out[n, plan.offset[s] : plan.offset[s] + plan.numel[s]] = _round_to(y, out.dtype)


def detokenize_ref(tokens: torch.Tensor, dests: Sequence[torch.Tensor], plan: ChunkPlan) -> None:
    """Write ``tokens`` [N, T*C] into ``dests`` (N*S tensors, model-major), de-normalized."""
    S = plan.num_segments
    for i, dst in enumerate(dests):
        n, s = divmod(i, S)
        y = tokens[n, plan.offset[s] : plan.offset[s] + plan.numel[s]].double()
        x = y * plan.scale[s] + plan.unshift[s]
        dst.copy_(_round_to(x, dst.dtype).view(dst.shape))


# ----------------------------------------------------------------------------------------
# Compiled backends (csrc/): registered as torch.ops.d2nwg.{tokenize_,detokenize_}.
# ----------------------------------------------------------------------------------------
def _tokenize_compiled(out, sources, plan: ChunkPlan) -> None:
    torch.ops.d2nwg.tokenize_(
        out, list(sources), list(plan.offset), list(plan.span), list(plan.shift), list(plan.rscale)
    )


def _detokenize_compiled(tokens, dests, plan: ChunkPlan) -> None:
    torch.ops.d2nwg.detokenize_(
        tokens, list(dests), list(plan.offset), list(plan.unshift), list(plan.scale)
    )


if _ext._C is not None:  # shapes for torch.compile: both ops write in place, return nothing

    @torch.library.register_fake("d2nwg::tokenize_")
    def _tokenize_fake(out, sources, offsets, spans, shift, rscale) -> None:
        return None

    @torch.library.register_fake("d2nwg::detokenize_")
    def _detokenize_fake(tokens, dests, offsets, shift, scale) -> None:
        return None


# ----------------------------------------------------------------------------------------
# Triton backend (kernels/tokenize.py), registered as torch.ops.d2nwg.{tokenize,detokenize}_
# triton_. torch.compile cannot trace the launchers (address tables from data_ptr(), and the
# interpreter's kernels are Python); as opaque in-place ops they stay in one graph. A ChunkPlan
# is no op argument type: it travels as its fields and is rebuilt (cached) inside the op.
# ----------------------------------------------------------------------------------------
_PLAN_ARGS = (
    "int[] numel, int[] offset, int[] span, float[] shift, float[] scale, int num_tokens, "
    "int chunk_size"
)


def _plan_args(plan: ChunkPlan) -> tuple:
    return (
        list(plan.numel),
        list(plan.offset),
        list(plan.span),
        [float(m) for m in plan.shift],
        [float(s) for s in plan.scale],
        plan.num_tokens,
        plan.chunk_size,
    )


_cached_plan = functools.lru_cache(maxsize=64)(ChunkPlan)  # the kernels cache tables per plan


def _plan_from(numel, offset, span, shift, scale, num_tokens, chunk_size) -> ChunkPlan:
    return _cached_plan(
        tuple(numel), tuple(offset), tuple(span), tuple(shift), tuple(scale), num_tokens, chunk_size
    )


def _register_triton_op(name: str, tensor_args: str, mutates: str) -> None:
    """torch.ops.d2nwg.<name>_triton_: ``<name>_triton`` of kernels/tokenize.py on the op's
    two tensor arguments and the plan's fields, with a fake that returns nothing."""

    def run(rows, tensors, *plan) -> None:
        from d2nwg.kernels import tokenize as kernels

        getattr(kernels, f"{name}_triton")(rows, tensors, _plan_from(*plan))

    op = torch.library.custom_op(
        f"d2nwg::{name}_triton_",
        run,
        mutates_args=(mutates,),
        schema=f"({tensor_args}, {_PLAN_ARGS}) -> ()",
    )
    op.register_fake(_fake_triton)


def _fake_triton(rows, tensors, *plan) -> None:
    return None


_register_triton_op("tokenize", "Tensor(a!) out, Tensor[] sources", mutates="out")
_register_triton_op("detokenize", "Tensor tokens, Tensor(a!)[] dests", mutates="dests")


def _tokenize_triton(out, sources, plan: ChunkPlan) -> None:
    torch.ops.d2nwg.tokenize_triton_.default(out, list(sources), *_plan_args(plan))


def _detokenize_triton(tokens, dests, plan: ChunkPlan) -> None:
    torch.ops.d2nwg.detokenize_triton_.default(tokens, list(dests), *_plan_args(plan))


def _ref_reason(*_) -> None:
    return None


def _triton_why_not(x, tensors, plan) -> str | None:
    return triton_reason([x])


TOKENIZE_BACKENDS = (
    Backend("cuda", _tokenize_compiled, compiled_reason("cuda", "tokenize_")),
    Backend("triton", _tokenize_triton, _triton_why_not),
    Backend("cpp", _tokenize_compiled, compiled_reason("cpu", "tokenize_")),
    Backend("torch", tokenize_ref, _ref_reason),
)
DETOKENIZE_BACKENDS = (
    Backend("cuda", _detokenize_compiled, compiled_reason("cuda", "detokenize_")),
    Backend("triton", _detokenize_triton, _triton_why_not),
    Backend("cpp", _detokenize_compiled, compiled_reason("cpu", "detokenize_")),
    Backend("torch", detokenize_ref, _ref_reason),
)


# ----------------------------------------------------------------------------------------
# Checks and public functions.
# ----------------------------------------------------------------------------------------
def _check_plan(plan) -> None:
    if not isinstance(plan, ChunkPlan):
        raise ConfigError(f"plan must be a ChunkPlan, got {type(plan).__name__}")


def _check_list(tensors, what: str) -> None:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise DTypeError(f"{what} must be a list or tuple of tensors, got {type(tensors).__name__}")


def check_data_tensor(t, what: str, meta_hint: str = "no data to read or write") -> None:
    """A strided tensor with data: sparse tensors have no flat memory, meta tensors none."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{what} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided:
        raise DTypeError(
            f"{what} has layout {t.layout}; only dense (strided) tensors are supported"
        )
    if t.device.type == "meta":
        raise DeviceError(f"{what} is on the meta device ({meta_hint})")


def _check_segments(
    tensors: Sequence[torch.Tensor], plan: ChunkPlan, device: torch.device, what: str
) -> None:
    S = plan.num_segments
    if S == 0 or len(tensors) % S:
        raise ShapeError(f"{what}: got {len(tensors)} tensors, expected a multiple of {S} segments")
    for i, t in enumerate(tensors):
        s = i % S
        check_data_tensor(t, f"{what}[{i}] (segment {s})")
        if t.numel() != plan.numel[s]:
            raise ShapeError(
                f"{what}[{i}] (segment {s}) has {t.numel()} elements, "
                f"the plan expects {plan.numel[s]}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(
                f"{what}[{i}] (segment {s}) has dtype {t.dtype}; expected one of {FLOAT_DTYPES}"
            )
        if t.device != device:
            raise DeviceError(f"{what}[{i}] (segment {s}) is on {t.device}, tokens on {device}")


def tokenize(
    sources: Sequence[torch.Tensor],
    plan: ChunkPlan,
    *,
    num_models: int | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Normalize, cast, pad and pack N*S tensors (model-major) into tokens ``[N, T, C]``.

    Each weight is read once and each token element written once (padding included).
    """
    _check_plan(plan)
    _check_list(sources, "sources")
    if num_models is None:
        n = len(sources) // max(plan.num_segments, 1)
    elif not isinstance(num_models, int) or isinstance(num_models, bool) or num_models < 0:
        raise ConfigError(f"num_models must be an int >= 0, got {num_models!r}")
    else:
        n = num_models
    if len(sources) != n * plan.num_segments:
        raise ShapeError(
            f"got {len(sources)} sources for num_models={n} models of {plan.num_segments} segments"
        )
    if len(sources):
        check_data_tensor(sources[0], "sources[0]")
    device = sources[0].device if len(sources) else torch.device("cpu")
    if len(sources):
        _check_segments(sources, plan, device, "sources")
    if out is None:
        if dtype not in FLOAT_DTYPES:
            raise DTypeError(f"token dtype {dtype} is not one of {FLOAT_DTYPES}")
        out = torch.empty(n, plan.num_tokens, plan.chunk_size, dtype=dtype, device=device)
    elif not isinstance(out, torch.Tensor) or out.layout != torch.strided:
        raise DTypeError(f"out must be a dense tensor or None, got {type(out).__name__}")
    elif out.shape != (n, plan.num_tokens, plan.chunk_size) or not out.is_contiguous():
        raise ShapeError(
            f"out has shape {tuple(out.shape)}, expected contiguous "
            f"{(n, plan.num_tokens, plan.chunk_size)}"
        )
    if out.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"out has dtype {out.dtype}; expected one of {FLOAT_DTYPES}")
    if len(sources) and out.device != device:  # a kernel would dereference foreign pointers
        raise DeviceError(f"out is on {out.device}, sources on {device}")
    sources = [t if t.is_contiguous() else t.contiguous() for t in sources]
    rows = out.view(n, plan.row_size)
    select("tokenize", TOKENIZE_BACKENDS, rows, sources, plan, backend=backend).run(
        rows, sources, plan
    )
    return out


def detokenize(
    tokens: torch.Tensor,
    dests: Sequence[torch.Tensor],
    plan: ChunkPlan,
    *,
    backend: str | None = None,
) -> None:
    """De-normalize tokens ``[N, T, C]`` and scatter them into N*S tensors, in place."""
    _check_plan(plan)
    check_data_tensor(tokens, "tokens")
    _check_list(dests, "dests")
    if tokens.dim() != 3 or tokens.shape[1:] != (plan.num_tokens, plan.chunk_size):
        raise ShapeError(
            f"tokens have shape {tuple(tokens.shape)}, expected "
            f"[N, {plan.num_tokens}, {plan.chunk_size}]"
        )
    if tokens.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"tokens have dtype {tokens.dtype}; expected one of {FLOAT_DTYPES}")
    _check_segments(dests, plan, tokens.device, "dests")
    if len(dests) != tokens.shape[0] * plan.num_segments:
        raise ShapeError(
            f"{len(dests)} destination tensors for {tokens.shape[0]} models of "
            f"{plan.num_segments} segments"
        )
    for i, d in enumerate(dests):
        if torch.compiler.is_compiling() or d.is_contiguous():  # contiguous: no overlap
            continue
        if torch._debug_has_internal_overlap(d) == 1:  # expanded: elements share memory
            raise ShapeError(
                f"dests[{i}] has overlapping elements (an expanded view?); "
                "it cannot be written in place"
            )
    rows = tokens.contiguous().view(tokens.shape[0], plan.row_size)
    direct = [
        d if d.is_contiguous() else torch.empty_like(d, memory_format=torch.contiguous_format)
        for d in dests
    ]
    select("detokenize", DETOKENIZE_BACKENDS, rows, direct, plan, backend=backend).run(
        rows, direct, plan
    )
    for d, w in zip(dests, direct):
        if w is not d:
            d.copy_(w)
