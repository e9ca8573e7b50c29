"""Which tensors a layout tokenizes: :class:`LayerSpec`, selection from a template, checks.

A template state dict fixes the layers: every floating tensor but BatchNorm running
statistics, unless ``include`` / ``exclude`` globs say otherwise, in the template's order.
Tensors that share storage in the template (tied weights) become one layer with aliases.
Only names, shapes, dtypes and storages are read, never values: a meta template will do.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from d2nwg.errors import ConfigError, DTypeError
from d2nwg.ops.tokenize_op import FLOAT_DTYPES
from d2nwg.tensors import StateDict, storage_key
from d2nwg.tokenizer import limits

# BatchNorm running statistics are state, not learned weights.
DEFAULT_EXCLUDE = ("*running_mean", "*running_var", "*num_batches_tracked")
FLOAT_DTYPE_NAMES = frozenset(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)


@dataclass(frozen=True)
class LayerSpec:
    """One tokenized tensor: its name, the names tied to it, shape, dtype and kind."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    aliases: tuple[str, ...] = ()
    kind: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def is_int(v) -> bool:
    """A true int (bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_kind(name: str, shape: tuple[int, ...]) -> str:
    """A coarse kind shared by alike tensors across layers: rank and last name part."""
    return f"{len(shape)}d.{name.rsplit('.', 1)[-1]}"


# ---------------------------------------------------------------------------- selection
def _check_patterns(include, exclude) -> None:
    for name, patterns in (("include", include), ("exclude", exclude)):
        # a bare string would be iterated as single-character patterns ('*' matches all)
        if patterns is not None and (
            isinstance(patterns, (str, bytes)) or not all(isinstance(p, str) for p in patterns)
        ):
            raise ConfigError(f"{name} must be a list of glob patterns, got {patterns!r:.80}")


def _tokenizable(name: str, t: torch.Tensor, by_name: bool) -> bool:
    """Whether a selected tensor can be tokenized; a dtype asked for by name that cannot be
    (``by_name``: an ``include`` matched it) is an error, not silently ignored."""
    if t.layout != torch.strided:
        raise DTypeError(
            f"state_dict[{name!r}] has layout {t.layout}; only dense "
            f"(strided) tensors can be tokenized"
        )
    if t.dtype in FLOAT_DTYPES:
        return True
    if by_name:
        raise DTypeError(
            f"state_dict[{name!r}] has dtype {t.dtype}; only floating "
            f"tensors {FLOAT_DTYPES} can be tokenized"
        )
    return False


def select_layers(
    state_dict: StateDict,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> tuple[list[LayerSpec], list[str]]:
    """(layers, ignored names) of a template state dict, in its order; tied tensors (same
    storage, not empty) become aliases of the first name that holds them."""
    if not isinstance(state_dict, Mapping):
        raise DTypeError(
            f"the template must be a state dict (a mapping of names to "
            f"tensors), got {type(state_dict).__name__}"
        )
    _check_patterns(include, exclude)
    exclude = DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
    layers: list[LayerSpec] = []
    ignored: list[str] = []
    tied: dict[tuple, int] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        selected = (
            include is None or any(fnmatch.fnmatchcase(name, p) for p in include)
        ) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
        if not selected or not _tokenizable(name, t, include is not None):
            ignored.append(name)
            continue
        key = storage_key(t)
        if key in tied and t.numel() > 0:
            first = layers[tied[key]]
            layers[tied[key]] = LayerSpec(
                first.name, first.shape, first.dtype, first.aliases + (name,), first.kind
            )
            continue
        tied[key] = len(layers)
        shape = tuple(t.shape)
        layers.append(LayerSpec(name, shape, dtype_name(t.dtype), (), layer_kind(name, shape)))
    if not layers:
        raise ConfigError(
            f"no floating tensor of the {len(state_dict)} in the state dict "
            f"is selected (include={include}, exclude={list(exclude)})"
        )
    return layers, ignored


# ---------------------------------------------------------------------------- checks
def _check_spec(i: int, spec) -> None:
    """Types and sizes of one layer, before anything is allocated for it."""
    if not isinstance(spec, LayerSpec):
        raise ConfigError(f"layers[{i}] is a {type(spec).__name__}, not a LayerSpec")
    if not isinstance(spec.name, str):
        raise ConfigError(f"layers[{i}].name must be a string, got {spec.name!r}")
    where = f"layer {spec.name!r}"
    rank, most = limits.MAX_RANK, limits.MAX_NUM_PARAMS
    if (
        not isinstance(spec.shape, tuple)
        or len(spec.shape) > rank
        or not all(is_int(n) and 0 <= n <= most for n in spec.shape)
    ):
        raise ConfigError(
            f"{where}: shape must be at most {rank} ints in [0, {most}], got {spec.shape!r}"
        )
    numel = 1
    for n in spec.shape:  # stops growing past the limit: no huge intermediate integers
        numel = min(numel * n, most + 1)
    if numel > most:
        raise ConfigError(
            f"{where}: shape {spec.shape} holds more than MAX_NUM_PARAMS = {most} weights"
        )
    if spec.dtype not in FLOAT_DTYPE_NAMES:
        raise ConfigError(
            f"{where}: dtype {spec.dtype!r} is not one of {sorted(FLOAT_DTYPE_NAMES)}"
        )
    if not isinstance(spec.kind, str):
        raise ConfigError(f"{where}: kind must be a string, got {spec.kind!r}")
    if not isinstance(spec.aliases, tuple) or not all(isinstance(a, str) for a in spec.aliases):
        raise ConfigError(f"{where}: aliases must be strings, got {spec.aliases!r}")


def check_layers(layers) -> tuple[LayerSpec, ...]:
    """A non-empty sequence of valid LayerSpecs whose names (aliases included) are distinct,
    as a tuple."""
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence):
        raise ConfigError(f"layers must be a sequence of LayerSpec, got {type(layers).__name__}")
    if not layers:
        raise ConfigError("no tensor selected for tokenization (check include/exclude)")
    if len(layers) > limits.MAX_LAYERS:
        raise ConfigError(f"{len(layers)} layers, more than MAX_LAYERS = {limits.MAX_LAYERS}")
    seen: set[str] = set()
    for i, spec in enumerate(layers):
        _check_spec(i, spec)
        for name in (spec.name,) + spec.aliases:
            if name in seen:
                raise ConfigError(f"the name {name!r} appears twice in the layout")
            seen.add(name)
    return tuple(layers)


def check_ignored(layers: Sequence[LayerSpec], ignored: Iterable[str]) -> frozenset[str]:
    """The names a layout knows but does not tokenize: strings, none of them a layer's."""
    if isinstance(ignored, (str, bytes)):
        raise ConfigError(f"ignored must be a collection of names, got {ignored!r}")
    ignored = frozenset(ignored)
    if not all(isinstance(name, str) for name in ignored):
        raise ConfigError("ignored names must be strings")
    for spec in layers:
        for name in (spec.name,) + spec.aliases:
            if name in ignored:
                raise ConfigError(f"the name {name!r} is both tokenized and ignored")
    return ignored
