"""The tensors a tokenizer reads and writes, checked against its layout before any is used.

Sources (the state dicts to tokenize or fit): keys, shapes, dtypes, data and ties, per
model. Destinations (a module or state dict to write into): every tensor is checked before
the first is written, so a bad one never leaves the target half-overwritten. Tokens: shape
and dtype. Finiteness: one cheap reduction, and only on failure a search for the culprit.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence

import torch

from d2nwg.errors import (
    DeviceError,
    DTypeError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
    shape_of,
)
from d2nwg.ops.tokenize_op import FLOAT_DTYPES, check_data_tensor
from d2nwg.tensors import StateDict, same_bits
from d2nwg.tokenizer.layers import LayerSpec


# ---------------------------------------------------------------------------- sources
def _check_keys(layers: Sequence[LayerSpec], known, state_dict: Mapping, where: str) -> None:
    missing = [s.name for s in layers if s.name not in state_dict]
    extra = [k for k in state_dict if not any(k in names for names in known)]
    if missing or extra:
        raise KeyMismatchError(
            f"{where} does not match the layout: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )


def _check_source(t, spec: LayerSpec, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{where}[{spec.name!r}] is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != spec.shape:
        raise ShapeError(
            f"{where}[{spec.name!r}] has shape {tuple(t.shape)}, the layout expects {spec.shape}"
        )
    if t.dtype != spec.torch_dtype:
        raise DTypeError(
            f"{where}[{spec.name!r}] has dtype {t.dtype}, the layout expects {spec.torch_dtype}"
        )
    check_data_tensor(
        t, f"{where}[{spec.name!r}]",
        "it holds no weights to tokenize; a meta template only fixes the layout",
    )  # fmt: skip


def _check_ties(t: torch.Tensor, spec: LayerSpec, state_dict: Mapping, where: str) -> None:
    """Ties are a property of the template; each model must hold them too, or its tied copy
    would silently be replaced by the tensor it is tied to."""
    for alias in spec.aliases:
        if alias in state_dict and not (
            isinstance(state_dict[alias], torch.Tensor) and same_bits(t, state_dict[alias])
        ):
            raise KeyMismatchError(
                f"{where}[{alias!r}] differs from {where}[{spec.name!r}], but the two "
                f"are tied in the template (one tensor), so the layout stores only "
                f"{spec.name!r}; to tokenize both, build the layout from a template "
                f"where they are separate tensors (e.g. a .clone() of one)"
            )


def sources(
    layers: Sequence[LayerSpec], known: Sequence[Container[str]], state_dict: StateDict, which: int
) -> list[torch.Tensor]:
    """The tensors of one state dict in layout order, after checking keys (``known``: sets
    of the names the layout tokenizes, aliases or ignores), shapes, dtypes, data and ties."""
    where = f"state dict {which}"
    if not isinstance(state_dict, Mapping):
        raise DTypeError(f"{where} is a {type(state_dict).__name__}, not a mapping")
    _check_keys(layers, known, state_dict, where)
    out = []
    for spec in layers:
        t = state_dict[spec.name]
        _check_source(t, spec, where)
        _check_ties(t, spec, state_dict, where)
        out.append(t)
    return out


def check_finite(
    layers: Sequence[LayerSpec], state_dicts: Sequence[StateDict], tokens: torch.Tensor
) -> None:
    """One cheap reduction over the tokens; only on failure find the layer to blame."""
    # A sum is NaN/Inf if any element is (and ~20x faster than isfinite().all() on CPU);
    # if the sum merely overflowed, the exact check below clears it.
    total = tokens.sum(dtype=torch.float64 if tokens.dtype == torch.float64 else torch.float32)
    if math.isfinite(float(total)) or bool(torch.isfinite(tokens).all()):
        return
    for n, sd in enumerate(state_dicts):
        for spec in layers:
            if not bool(torch.isfinite(sd[spec.name]).all()):
                raise NonFiniteError(
                    f"state dict {n}[{spec.name!r}] holds NaN or Inf "
                    f"(pass allow_nonfinite=True to tokenize it anyway)"
                )
    raise NonFiniteError(
        f"normalized weights overflow the token dtype {tokens.dtype}; use a wider dtype"
    )


def check_tokens(tokens, rank: int, num_tokens: int, chunk_size: int) -> None:
    """``[N, T, C]`` (rank 3) or ``[T, C]`` (rank 2) tokens of a floating dtype."""
    expected = ("[N, " if rank == 3 else "[") + f"{num_tokens}, {chunk_size}]"
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dim() != rank
        or tuple(tokens.shape[-2:]) != (num_tokens, chunk_size)
    ):
        raise ShapeError(f"tokens have shape {shape_of(tokens)}, expected {expected}")
    if tokens.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"tokens have dtype {tokens.dtype}; expected one of {FLOAT_DTYPES}")


# ---------------------------------------------------------------------------- destinations
def _named_tensors(target) -> Mapping:
    if isinstance(target, torch.nn.Module):
        named = dict(target.named_parameters(remove_duplicate=False))
        named.update(target.named_buffers(remove_duplicate=False))
        return named
    if isinstance(target, Mapping):
        return target
    raise DTypeError(
        f"detokenize_into() writes into an nn.Module or a state dict, got {type(target).__name__}"
    )


def _check_destination(named: Mapping, name: str, spec: LayerSpec) -> torch.Tensor:
    t = named[name]
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"target[{name!r}] is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != spec.shape:
        raise ShapeError(
            f"target[{name!r}] has shape {tuple(t.shape)}, the layout expects {spec.shape}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"target[{name!r}] has dtype {t.dtype}, not floating")
    check_data_tensor(
        t, f"target[{name!r}]",
        "no memory to write into; materialize the module first, e.g. with to_empty()",
    )  # fmt: skip
    if torch._debug_has_internal_overlap(t) == 1:
        raise ShapeError(
            f"target[{name!r}] has overlapping elements (an expanded view?) "
            f"and cannot be written in place"
        )
    return t.detach()


def _check_no_shared_memory(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Destinations that the layout writes separately must not share memory: the second write
    would silently overwrite the first (a target whose tensors are tied when the template's
    were not)."""
    ranges = []
    for name, t in named:
        if t.numel() == 0:
            continue
        lo = t.storage_offset() * t.element_size()
        hi = lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        ranges.append((t.untyped_storage()._cdata, lo, hi, name))
    ranges.sort()
    for (sa, _, ha, na), (sb, lb, _, nb) in zip(ranges, ranges[1:]):
        if sa == sb and lb < ha:
            raise ShapeError(
                f"target[{na!r}] and target[{nb!r}] share memory, but the layout "
                f"holds them as separate tensors; writing one would overwrite the "
                f"other (untie them in the target)"
            )


def destinations(
    layers: Sequence[LayerSpec], target, partial: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of ``target`` (a module or a state dict) that the layout writes, by name
    (tied copies included), all checked; ``partial=True`` allows a subset of the layout."""
    named = _named_tensors(target)
    missing = [s.name for s in layers if s.name not in named]
    if missing and not partial:
        raise KeyMismatchError(f"target lacks keys of the layout: {missing[:8]}")
    dests = {}
    for spec in layers:
        for name in (spec.name, *spec.aliases):
            if name in named:
                dests[name] = _check_destination(named, name, spec)
    devices = {d.device for d in dests.values()}
    if len(devices) > 1:
        raise DeviceError(f"target tensors are on several devices: {sorted(map(str, devices))}")
    _check_no_shared_memory([(s.name, dests[s.name]) for s in layers if s.name in dests])
    return dests
