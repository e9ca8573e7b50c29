"""Class rows: which tokens write which row of a layer whose dim-0 rows belong to classes.

The output layer of a classifier has one row per class, and a dataset condition has one token
per class (:class:`d2nwg.DatasetEncoder`). Naming such layers (``D2NWGConfig.class_rows``)
lets the denoiser hand the tokens of row k class k's condition token
(:class:`d2nwg.LatentDenoiser`, ``class_index``), so that the map from the condition to
those rows is equivariant to class order by construction.

Every row of such a layer must start a token and no token may hold values of two rows, so
that every row is cut into the same tokens. A layout whose ``row_tokens`` hold the layer
(:class:`~d2nwg.tokenizer.plan.LayoutPlan`; what the generator builds) pads each row to whole
tokens; otherwise its rows must fill whole tokens by themselves (the row length, the layer's
``numel / shape[0]``, a multiple of the chunk size C, and the layer starting on a token). A
row is then ``ceil(r / C)`` tokens, numbered 0.. within the row: their position, in place of
the chunk index within the layer, which would tell row k from row j.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from d2nwg.errors import ConfigError
from d2nwg.tokenizer.layers import LayerSpec
from d2nwg.tokenizer.plan import LayoutPlan


@dataclass(frozen=True)
class RowClasses:
    """Per token of a layout: ``index [T]`` long, the class row it writes (-1: none), and
    ``chunk [T]`` long, its chunk index within that row (within its layer for other tokens,
    as in :attr:`LayoutPlan.positions`)."""

    index: torch.Tensor
    chunk: torch.Tensor


def matching_layers(layers: Sequence[LayerSpec], patterns: Sequence[str]) -> list[int]:
    """Indices of the layers whose name (or a tied alias) matches any glob of ``patterns``;
    a pattern that matches no layer is an error (a typo must not silently do nothing)."""
    if isinstance(patterns, (str, bytes)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"class_rows must be a list of glob patterns, got {patterns!r:.80}")
    names = [(spec.name, *spec.aliases) for spec in layers]
    found: set[int] = set()
    for p in patterns:
        hits = {s for s, ns in enumerate(names) if any(fnmatch.fnmatchcase(n, p) for n in ns)}
        if not hits:
            raise ConfigError(
                f"class_rows pattern {p!r} matches no tokenized tensor; the layout holds "
                f"{[n[0] for n in names][:20]}"
            )
        found |= hits
    return sorted(found)


def row_token_layers(layers: Sequence[LayerSpec], names: Iterable[str]) -> frozenset[int]:
    """The indices of the layers named (exactly, as a tokenizer file stores them)."""
    if isinstance(names, (str, bytes)):
        raise ConfigError(f"row_tokens must be a list of layer names, got {names!r:.80}")
    index = {spec.name: s for s, spec in enumerate(layers)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ConfigError(f"row_tokens names {unknown!r:.80}, which the layout does not hold")
    return frozenset(index[n] for n in names)


def row_classes(plan: LayoutPlan, patterns: Sequence[str]) -> RowClasses:
    """The class row of every token of ``plan`` for the layers ``patterns`` name (see the
    module docstring); a named layer whose rows can't be cut into whole tokens is an error
    that says which chunk sizes would do."""
    C = plan.chunk_size
    index = torch.full((plan.num_tokens,), -1, dtype=torch.long)
    chunk = plan.positions[:, 1].clone()
    for s in matching_layers(plan.layers, patterns):
        spec, off, numel = plan.layers[s], plan.offsets[s], plan.numel[s]
        if numel == 0:
            continue
        width = numel // spec.shape[0] if spec.shape else numel
        if s in plan.row_tokens:
            width = plan.spans[s] // spec.shape[0]  # each row padded by the plan to whole tokens
        elif width % C or off % C:
            raise ConfigError(
                f"class_rows: the rows of {spec.name!r} {list(spec.shape)} hold {width} values "
                f"each, not whole tokens of chunk_size={C} (a token would mix classes); use a "
                f"chunk_size that divides {width}, or a tokenizer whose row_tokens hold it"
            )
        per_row = width // C
        tokens = torch.arange(off // C, (off + plan.spans[s]) // C)
        local = tokens - off // C
        index[tokens] = local // per_row
        chunk[tokens] = local % per_row
    return RowClasses(index, chunk)
