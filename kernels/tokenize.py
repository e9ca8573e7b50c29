"""Triton kernels of fused chunk tokenization (reference, checks: d2nwg/ops/tokenize_op.py;
the plan: d2nwg/ops/tokenize_layout.py).

Multi-tensor: the N*S parameter tensors are reached through a table of their base addresses
(an int64 tensor of ``data_ptr()`` values) that each program loads and casts with
``.to(tl.pointer_type(DTYPE))``. This works on GPU and under ``TRITON_INTERPRET=1`` (checked
with Triton 3.8: the interpreter's pointers are plain host addresses), so the same kernel is
tested on CPU. A pointer type is a compile-time property, so tensors are grouped by the dtype
that varies (sources for tokenize, destinations for detokenize): one launch per dtype present.

Work layout of a launch: program ``pid`` handles BLOCK elements of one item (one model's
segment). ``item_of_block[pid]`` names the item and ``first_block[item]`` where its blocks
start; these tables depend only on the plan and the dtypes, so they are cached per plan.

Arithmetic, identical to the reference and the C++/CUDA kernels:
    tokenize:    fp32((x - shift) * rscale) in float64, then the token dtype (float64: no fp32 step)
    detokenize:  fp32(y * scale + unshift) in float64, then the weight dtype (unshift: the shift,
                 0 spelled -0.0 so that zeros keep their sign)
launched with ``enable_fp_fusion=False`` so ``y * scale + unshift`` is never contracted to an FMA.

Blocks that lie wholly inside the data take an unmasked path: with the ALIGNED hints (all
base addresses 16-byte aligned) the compiler can then use vector loads and stores even though
the item sizes are runtime values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from d2nwg.backends import launch_device
from d2nwg.errors import ConfigError, DeviceError, DTypeError, ShapeError
from d2nwg.ops.tokenize_layout import ChunkPlan

BLOCK_GPU = 4096  # elements per program on a GPU (8 warps: 16 elements per thread)
BLOCK_CPU = 256  # under the interpreter: small enough that tests cross block edges
NUM_WARPS = 8

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit
def _to_f64(x, DTYPE: tl.constexpr):
    """DTYPE -> float64, exactly. bfloat16 widens through its bits: the interpreter's
    bfloat16 <-> float32 casts are not exact (truncation, no carry), the bit form is exact
    everywhere."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(tl.float64)
    else:
        return x.to(tl.float64)


@triton.jit
def _to_dtype(y, DTYPE: tl.constexpr):
    """float64 -> DTYPE through float32, round to nearest even at each step (the reference)."""
    if DTYPE == tl.float64:
        return y
    elif DTYPE == tl.bfloat16:  # round to nearest even on the bits (as c10::BFloat16), NaN kept
        f = y.to(tl.float32)
        u = f.to(tl.uint32, bitcast=True)
        r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        r = tl.where(f != f, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(tl.float32).to(DTYPE)


@triton.jit
def _item_block(item_of_block_ptr, first_block_ptr, numel_ptr, BLOCK: tl.constexpr):
    """This program's item, the offset of its block in the item's elements, and the item's
    element count."""
    pid = tl.program_id(0)
    item = tl.load(item_of_block_ptr + pid)
    start = (pid - tl.load(first_block_ptr + item)).to(tl.int64) * BLOCK
    return item, start, tl.load(numel_ptr + item)


@triton.jit
def _item_pointers(
    addr_ptr, rows_ptr, offset_ptr, item, start,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The item's tensor (its base address from ``addr_ptr`` as a ``*DTYPE``), the item in the
    token rows (``rows_ptr`` + its offset from ``offset_ptr``) and the block's element offsets,
    with the ALIGNED hints (the launcher checked: every base address 16-byte aligned, every
    offset 16 bytes' worth of tokens).

    The loads are made here, not passed in: ``tl.multiple_of`` marks the operation that
    defines its value, and a helper's argument has none in the helper, so a hint on an
    argument is dropped (that cost the 128-bit accesses once)."""
    addr = tl.load(addr_ptr + item)
    offset = tl.load(offset_ptr + item)
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
        offset = tl.multiple_of(offset, 128 // rows_ptr.dtype.element_ty.primitive_bitwidth)
    tensor = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        tensor = tl.multiple_of(tensor, 16)
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return tensor, rows_ptr + offset, offs


# Parameters grouped on lines, as in flash-attention's Triton kernels (ruff would put each on
# a line of its own). Per-item tables are indexed by item (see the module docstring).
@triton.jit
def _tokenize_kernel(
    out_ptr, src_addr_ptr,  # *OUT [N * T*C] tokens; *int64 base addresses of the sources
    item_of_block_ptr, first_block_ptr,  # *int32 [blocks], *int32 [items]
    dst_ptr, numel_ptr, span_ptr,  # *int64: the item's offset in out (n*T*C + offset[s]), ...
    shift_ptr, rscale_ptr,  # *float64
    SRC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    item, start, numel = _item_block(item_of_block_ptr, first_block_ptr, numel_ptr, BLOCK)
    span = tl.load(span_ptr + item)
    shift, rscale = tl.load(shift_ptr + item), tl.load(rscale_ptr + item)
    src, out, offs = _item_pointers(
        src_addr_ptr, out_ptr, dst_ptr, item, start, SRC, ALIGNED, BLOCK
    )
    if start + BLOCK <= numel:  # whole block of weights: no masks, vector accesses
        x = _to_f64(tl.load(src + offs), SRC)
        tl.store(out + offs, _to_dtype((x - shift) * rscale, out_ptr.dtype.element_ty))
    else:  # tail of the weights and/or padding (written as zeros)
        real = offs < numel
        x = _to_f64(tl.load(src + offs, mask=real, other=0.0), SRC)
        y = tl.where(real, (x - shift) * rscale, 0.0)
        tl.store(out + offs, _to_dtype(y, out_ptr.dtype.element_ty), mask=offs < span)


@triton.jit
def _detokenize_kernel(
    tok_ptr, dst_addr_ptr,  # *TOK [N * T*C] tokens; *int64 base addresses of the destinations
    item_of_block_ptr, first_block_ptr,  # *int32 [blocks], *int32 [items]
    src_ptr, numel_ptr,  # *int64: the item's offset in the tokens, its element count
    scale_ptr, shift_ptr,  # *float64
    DST: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    item, start, numel = _item_block(item_of_block_ptr, first_block_ptr, numel_ptr, BLOCK)
    scale, shift = tl.load(scale_ptr + item), tl.load(shift_ptr + item)
    dst, tok, offs = _item_pointers(
        dst_addr_ptr, tok_ptr, src_ptr, item, start, DST, ALIGNED, BLOCK
    )
    if start + BLOCK <= numel:
        y = _to_f64(tl.load(tok + offs), tok_ptr.dtype.element_ty)
        tl.store(dst + offs, _to_dtype(y * scale + shift, DST))
    else:
        mask = offs < numel
        y = _to_f64(tl.load(tok + offs, mask=mask, other=0.0), tok_ptr.dtype.element_ty)
        tl.store(dst + offs, _to_dtype(y * scale + shift, DST), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------
def _block_size(device: torch.device) -> int:
    return BLOCK_CPU if device.type == "cpu" else BLOCK_GPU


@functools.lru_cache(maxsize=64)
def _layout(
    plan,
    num_models: int,
    dtypes: tuple[torch.dtype, ...],
    block: int,
    padded: bool,
    device: torch.device,
) -> list[tuple[torch.dtype, list[int], dict[str, torch.Tensor]]]:
    """Per dtype group: (dtype, item indices, device tables). Depends on the plan only.

    ``padded``: tokenize items cover their span (values then zeros); detokenize items cover
    their numel. Items with nothing to do get no blocks.
    """
    S = plan.num_segments
    R = plan.row_size
    groups = []
    for dtype in sorted(set(dtypes), key=str):
        items = [i for i, d in enumerate(dtypes) if d == dtype]
        item_of_block, first_block, offset, numel, span, shift, scale = [], [], [], [], [], [], []
        kept = []
        for i in items:
            n, s = divmod(i, S)
            length = plan.span[s] if padded else plan.numel[s]
            blocks = triton.cdiv(length, block)
            if blocks == 0:
                continue
            first_block.append(len(item_of_block))
            item_of_block.extend([len(kept)] * blocks)
            kept.append(i)
            offset.append(n * R + plan.offset[s])
            numel.append(plan.numel[s])
            span.append(plan.span[s])
            shift.append(plan.shift[s] if padded else plan.unshift[s])
            scale.append(plan.rscale[s] if padded else plan.scale[s])
        if not kept:
            continue
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        tables = {
            "item_of_block": torch.tensor(item_of_block, **i32),
            "first_block": torch.tensor(first_block, **i32),
            "offset": torch.tensor(offset, **i64),
            "offset_list": offset,
            "numel": torch.tensor(numel, **i64),
            "span": torch.tensor(span, **i64),
            "shift": torch.tensor(shift, **f64),
            "scale": torch.tensor(scale, **f64),
        }
        groups.append((dtype, kept, tables))
    return groups


def _check_launch(rows: torch.Tensor, tensors: Sequence[torch.Tensor], plan, what: str) -> None:
    """Everything a launch dereferences, checked whatever the caller passed (the launchers are
    reachable directly and through ``torch.ops.d2nwg.*_triton_``): rows ``[N, row_size]``
    contiguous floating, ``N * S`` contiguous floating tensors on the rows' device, each with
    exactly the plan's element count for its segment (a smaller tensor would be read or
    written past its end)."""
    if not isinstance(plan, ChunkPlan):  # a ChunkPlan checked its own tiling when it was made
        raise ConfigError(f"{what}: plan must be a ChunkPlan, got {type(plan).__name__}")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.layout != torch.strided:
        raise ShapeError(
            f"{what}: tokens must be a strided [N, T*C] tensor, got "
            f"{getattr(rows, 'shape', type(rows).__name__)}"
        )
    if rows.dtype not in _TL_DTYPE:
        raise DTypeError(
            f"{what}: tokens have dtype {rows.dtype}; expected one of {list(_TL_DTYPE)}"
        )
    if rows.shape[1] != plan.row_size or not rows.is_contiguous():
        raise ShapeError(
            f"{what}: tokens have shape {tuple(rows.shape)}, expected contiguous "
            f"[N, {plan.row_size}]"
        )
    S = plan.num_segments
    if not isinstance(tensors, (list, tuple)) or S == 0 or len(tensors) != rows.shape[0] * S:
        raise ShapeError(
            f"{what}: {len(tensors) if isinstance(tensors, (list, tuple)) else tensors!r} "
            f"tensors for {rows.shape[0]} models of {S} segments"
        )
    for i, t in enumerate(tensors):
        s = i % S
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise DTypeError(f"{what}: tensor {i} is not a strided tensor")
        if t.dtype not in _TL_DTYPE:
            raise DTypeError(
                f"{what}: tensor {i} has dtype {t.dtype}; expected one of {list(_TL_DTYPE)}"
            )
        if t.device != rows.device:
            raise DeviceError(f"{what}: tensor {i} is on {t.device}, the tokens on {rows.device}")
        if not t.is_contiguous():
            raise ShapeError(f"{what}: tensor {i} is not contiguous")
        if t.numel() != plan.numel[s]:
            raise ShapeError(
                f"{what}: tensor {i} (segment {s}) has {t.numel()} elements, the "
                f"plan has {plan.numel[s]}"
            )


def _aligned(addresses: Sequence[int], base: int, offsets: Sequence[int], itemsize: int) -> bool:
    """The kernels' ALIGNED hints: every address 16-byte aligned, and every element offset into
    the tokens a multiple of 16 bytes (``tl.multiple_of(dst, 16 // itemsize)``). The base must
    then be aligned itself: base + offset aligned with a misaligned base would make that hint
    on the offset false."""
    return (
        base % 16 == 0
        and all(a % 16 == 0 for a in addresses)
        and all(o * itemsize % 16 == 0 for o in offsets)
    )


def tokenize_triton(
    out_rows: torch.Tensor, sources: Sequence[torch.Tensor], plan, *, block: int | None = None
) -> None:
    """Fill tokens ``out_rows`` [N, T*C] (contiguous) from N*S contiguous ``sources``.

    Sources are model-major (``sources[n * S + s]`` is segment s of model n) and may mix
    dtypes; one launch per source dtype.
    """
    tables = ("numel", "span", "shift", "scale")
    _launch(_tokenize_kernel, "tokenize_triton", out_rows, sources, plan, block, tables, "SRC")


def detokenize_triton(
    tokens_rows: torch.Tensor, dests: Sequence[torch.Tensor], plan, *, block: int | None = None
) -> None:
    """Write tokens ``tokens_rows`` [N, T*C] (contiguous) into N*S contiguous ``dests``.

    Destinations are model-major and may mix dtypes; one launch per destination dtype.
    """
    tables = ("numel", "scale", "shift")
    _launch(_detokenize_kernel, "detokenize_triton", tokens_rows, dests, plan, block, tables, "DST")


def _launch(kernel, what: str, rows, tensors, plan, block, tables, dtype_arg: str) -> None:
    """Check, then launch ``kernel`` once per dtype of ``tensors`` (the sources of tokenize,
    the destinations of detokenize: the kernel's constexpr ``dtype_arg``). ``tables``: the
    per-item tables the kernel takes after the offsets; with a "span" table (tokenize) the
    items cover their spans (values, then zeros), else their element counts."""
    _check_launch(rows, tensors, plan, what)
    if rows.numel() == 0:  # (no tensors: N * S == 0 tensors, checked, so N == 0)
        return
    block = block or _block_size(rows.device)
    dtypes = tuple(t.dtype for t in tensors)
    layout = _layout(plan, rows.shape[0], dtypes, block, "span" in tables, rows.device)
    for dtype, items, tab in layout:
        addresses = [tensors[i].data_ptr() for i in items]
        aligned = _aligned(addresses, rows.data_ptr(), tab["offset_list"], rows.element_size())
        addr = torch.tensor(addresses, dtype=torch.int64, device=rows.device)
        grid = (tab["item_of_block"].numel(),)
        with launch_device(rows):
            kernel[grid](
                rows,
                addr,
                tab["item_of_block"],
                tab["first_block"],
                tab["offset"],
                *(tab[name] for name in tables),
                **{dtype_arg: _TL_DTYPE[dtype]},
                ALIGNED=aligned,
                BLOCK=block,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
