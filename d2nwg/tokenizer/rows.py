"""Class rows: which tokens write which row of a layer whose dim-0 rows belong to classes.

The output layer of a classifier has one row per class, and a dataset condition has one token
per class (:class:`d2nwg.DatasetEncoder`). Naming such layers (``D2NWGConfig.class_rows``)
lets the denoiser hand the tokens of row k class k's condition token
(:class:`d2nwg.LatentDenoiser`, ``class_index``), so that the map from the condition to
those rows is equivariant to class order by construction.

A layer's rows are aligned all together or not at all: each row must start on a token
boundary and fill whole tokens (its length, the layer's ``numel / shape[0]``, a multiple of
the chunk size C, and the layer starting on a token), so that every row is cut into the same
tokens and no token holds values of two rows. A row of ``r`` values is then ``r / C``
tokens, numbered 0.. within the row: their position, in place of the chunk index within the
layer, which would tell row k from row j.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from d2nwg.errors import ConfigError
from d2nwg.tokenizer.plan import LayoutPlan


@dataclass(frozen=True)
class RowClasses:
    """Per token of a layout: ``index [T]`` long, the class row it writes (-1: none), and
    ``chunk [T]`` long, its chunk index within that row (within its layer for other tokens,
    as in :attr:`LayoutPlan.positions`)."""

    index: torch.Tensor
    chunk: torch.Tensor


def matching_layers(plan: LayoutPlan, patterns: Sequence[str]) -> list[int]:
    """Indices of the layers whose name (or a tied alias) matches any glob of ``patterns``;
    a pattern that matches no layer is an error (a typo must not silently do nothing)."""
    if isinstance(patterns, (str, bytes)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"class_rows must be a list of glob patterns, got {patterns!r:.80}")
    names = [(spec.name, *spec.aliases) for spec in plan.layers]
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


def row_classes(plan: LayoutPlan, patterns: Sequence[str]) -> RowClasses:
    """The class row of every token of ``plan`` for the layers ``patterns`` name (see the
    module docstring); a named layer whose rows can't be cut into whole tokens is an error
    that says which chunk sizes would do."""
    C = plan.chunk_size
    index = torch.full((plan.num_tokens,), -1, dtype=torch.long)
    chunk = plan.positions[:, 1].clone()
    for s in matching_layers(plan, patterns):
        spec, off, numel = plan.layers[s], plan.offsets[s], plan.numel[s]
        rows = spec.shape[0] if spec.shape else 1
        width = numel // rows if rows else 0
        if numel == 0:
            continue
        if width % C or off % C:
            raise ConfigError(
                f"class_rows: the rows of {spec.name!r} {list(spec.shape)} hold {width} values "
                f"each, not whole tokens of chunk_size={C} (a token would mix classes); use a "
                f"chunk_size that divides {width}"
            )
        per_row = width // C
        tokens = torch.arange(off // C, (off + numel) // C)
        local = tokens - off // C
        index[tokens] = local // per_row
        chunk[tokens] = local % per_row
    return RowClasses(index, chunk)


def row_chunk_size(
    plan: LayoutPlan, patterns: Sequence[str], chunk_size: int, least: int = 1
) -> int:
    """The largest chunk size in ``[least, chunk_size]`` that cuts every row of the layers
    ``patterns`` names into whole tokens (a divisor of their row widths): what a derived
    chunk size becomes when class rows are asked for (``plan``'s own chunk size does not
    matter). None there is an error naming the rows."""
    named = [s for s in matching_layers(plan, patterns) if plan.numel[s]]
    widths = {plan.layers[s].name: plan.numel[s] // plan.layers[s].shape[0] for s in named}
    g = math.gcd(*widths.values()) if widths else chunk_size
    size = next(d for d in range(min(chunk_size, g), 0, -1) if g % d == 0)
    if size < least:
        raise ConfigError(
            f"class_rows: rows of {widths} values can't be cut into whole tokens of at least "
            f"{least} values (the ChunkVAE's smallest chunk): a token would mix classes"
        )
    return size
