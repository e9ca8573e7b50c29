"""The layout plan: where every element of every tokenized tensor goes, from shapes alone.

:class:`LayoutPlan` places the layers of a layout in the flat ``[T * C]`` token row of one
model and derives everything that depends only on that placement: the token count, each
layer's element offset and span, the ``[T, C]`` padding mask, each token's (layer, chunk)
position and kind, the token runs that windows cut, and the :class:`ChunkPlan` the ops
execute (for the whole row, or for a range of tokens that streaming writes). It reads no
tensor values and holds no weights, so it can be built and tested on meta templates:

- ``granularity="layer"``: each tensor is padded to whole chunks, so no token mixes layers;
- ``granularity="model"``: all tensors are concatenated and padded once at the end.

``row_tokens`` (layer granularity) names layers whose dim-0 rows each start a token: a row
of ``r`` values takes ``ceil(r / C)`` tokens, the last one padded, so that no token holds
values of two rows (the class rows of :mod:`d2nwg.tokenizer.rows`). Such a layer is one
segment per row in the ops' plan.
"""

from __future__ import annotations

import functools
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from d2nwg.errors import ConfigError, ShapeError
from d2nwg.ops.tokenize_op import ChunkPlan
from d2nwg.tokenizer import limits
from d2nwg.tokenizer.layers import LayerSpec, check_layers, is_int

GRANULARITIES = ("layer", "model")


def check_chunking(chunk_size, granularity) -> None:
    """A chunk size in [1, MAX_CHUNK_SIZE] and a known granularity."""
    if not is_int(chunk_size) or not 1 <= chunk_size <= limits.MAX_CHUNK_SIZE:
        raise ConfigError(
            f"chunk_size must be an int in [1, {limits.MAX_CHUNK_SIZE}], got {chunk_size!r}"
        )
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be 'layer' or 'model', got {granularity!r}")


def _spans(numel: Sequence[int], C: int, granularity: str) -> list[int]:
    """Elements each layer owns in the row: its own, and the padding that follows it."""
    if granularity == "layer":
        return [-(-n // C) * C for n in numel]
    total = sum(numel)
    return list(numel[:-1]) + [numel[-1] + (-(-total // C) * C - total)]


class Segment(NamedTuple):
    """A contiguous run of ``count`` elements of layer ``layer`` from element ``start`` of it
    (memory order), placed at element ``offset`` of the row, owning ``span >= count``."""

    layer: int
    start: int
    count: int
    offset: int
    span: int


class RangePart(NamedTuple):
    """One segment of a range plan: ``count`` elements of layer ``layer`` from element
    ``start`` of it (memory order); layer -1 is the empty segment of leading padding."""

    layer: int
    start: int
    count: int


@dataclass(frozen=True)
class LayoutPlan:
    """Placement of ``layers`` in a row of ``num_tokens * chunk_size`` elements.

    Attributes (derived): ``numel[s]`` elements of layer s start at element ``offsets[s]``
    and own ``spans[s] >= numel[s]`` of them (the rest is zero padding); the spans tile the
    row. ``segments``: the contiguous runs of elements the ops place, one per layer, or one
    per row of a layer in ``row_tokens`` (layer indices). The tensors (mask, positions,
    kinds) are built on first use and then shared.
    """

    layers: tuple[LayerSpec, ...]
    chunk_size: int
    granularity: str = "layer"
    row_tokens: frozenset[int] = frozenset()
    numel: tuple[int, ...] = field(init=False, repr=False)
    offsets: tuple[int, ...] = field(init=False, repr=False)
    spans: tuple[int, ...] = field(init=False, repr=False)
    segments: tuple[Segment, ...] = field(init=False, repr=False)
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        check_chunking(self.chunk_size, self.granularity)
        object.__setattr__(self, "layers", check_layers(self.layers))
        object.__setattr__(self, "row_tokens", self._check_row_tokens(self.row_tokens))
        numel = tuple(spec.numel for spec in self.layers)
        total, C = sum(numel), self.chunk_size
        if total > limits.MAX_NUM_PARAMS:
            raise ConfigError(
                f"the layout holds {total} weights per model, more than "
                f"d2nwg.tokenizer.MAX_NUM_PARAMS = {limits.MAX_NUM_PARAMS}"
            )
        spans = _spans(numel, C, self.granularity)
        for s in self.row_tokens:  # rows padded to whole tokens each
            rows = self.layers[s].shape[0]
            spans[s] = rows * -(-(numel[s] // rows) // C) * C if rows else 0
        T = sum(spans) // C
        if T > limits.MAX_NUM_TOKENS:
            raise ConfigError(
                f"the layout needs {T} tokens of {C} values per model, more than "
                f"d2nwg.tokenizer.MAX_NUM_TOKENS = {limits.MAX_NUM_TOKENS} (use a larger "
                f"chunk_size)"
            )
        offsets = [0]
        for span in spans[:-1]:
            offsets.append(offsets[-1] + span)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "spans", tuple(spans))
        object.__setattr__(self, "segments", self._segments())
        object.__setattr__(self, "num_tokens", T)

    def _check_row_tokens(self, row_tokens) -> frozenset[int]:
        if isinstance(row_tokens, (str, bytes)) or not all(
            is_int(s) and 0 <= s < len(self.layers) for s in row_tokens
        ):
            raise ConfigError(
                f"row_tokens must be layer indices in [0, {len(self.layers)}), got "
                f"{row_tokens!r:.80}"
            )
        row_tokens = frozenset(row_tokens)
        if row_tokens and self.granularity != "layer":
            raise ConfigError("row_tokens needs granularity='layer' (model tokens mix layers)")
        for s in row_tokens:
            if not self.layers[s].shape:
                raise ConfigError(f"row_tokens: {self.layers[s].name!r} is a scalar: no rows")
        return row_tokens

    def _segments(self) -> tuple[Segment, ...]:
        out = []
        for s, (off, n, span) in enumerate(zip(self.offsets, self.numel, self.spans)):
            if s not in self.row_tokens or n == 0:
                out.append(Segment(s, 0, n, off, span))
                continue
            rows = self.layers[s].shape[0]
            width, row_span = n // rows, span // rows
            out.extend(
                Segment(s, k * width, width, off + k * row_span, row_span) for k in range(rows)
            )
        return tuple(out)

    def segment_views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per layer (layout order) -> one per segment: a layer of row tokens as
        its rows, flat (views of a contiguous tensor, else copies)."""
        if not self.row_tokens:
            return list(tensors)
        return [
            tensors[seg.layer]
            if seg.layer not in self.row_tokens
            else tensors[seg.layer].reshape(-1)[seg.start : seg.start + seg.count]
            for seg in self.segments
        ]

    # ------------------------------------------------------------------ token ranges
    @property
    def num_params(self) -> int:
        """Weights per model (tied tensors counted once)."""
        return sum(self.numel)

    @property
    def token_runs(self) -> list[tuple[int, int]]:
        """``[start, stop)`` token ranges that no token shares with another run: one per
        non-empty layer for ``granularity="layer"``, the whole sequence for ``"model"``
        (whose tokens mix layers). Windows (:class:`d2nwg.windows.WindowLayout`) cut these."""
        if self.granularity == "model":
            return [(0, self.num_tokens)]
        C = self.chunk_size
        return [(o // C, (o + s) // C) for o, s in zip(self.offsets, self.spans) if s]

    def token_range(self, layers: Iterable[int]) -> tuple[int, int]:
        """The ``[start, stop)`` tokens that hold the elements of the given layer indices."""
        C, layers = self.chunk_size, set(layers)
        ends = [(g.offset, g.offset + g.count) for g in self.segments if g.layer in layers]
        return min(a for a, _ in ends) // C, -(-max(b for _, b in ends) // C)

    # ------------------------------------------------------------------ per-token tensors
    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """``[T, C]`` bool, True where a token element holds a weight (False = padding)."""
        flat = torch.zeros(self.num_tokens * self.chunk_size, dtype=torch.bool)
        for seg in self.segments:
            flat[seg.offset : seg.offset + seg.count] = True
        return flat.view(self.num_tokens, self.chunk_size)

    @functools.cached_property
    def _layer_of_token(self) -> torch.Tensor:
        """``[T]``: the layer a token's first element belongs to (empty layers own none)."""
        starts = torch.tensor(self.offsets, dtype=torch.long)
        token_start = torch.arange(self.num_tokens, dtype=torch.long) * self.chunk_size
        return torch.searchsorted(starts, token_start, right=True) - 1

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """``[T, 2]`` long: (layer index, chunk index within the layer; within the model for
        ``granularity="model"``)."""
        layer = self._layer_of_token
        if self.granularity == "layer":
            starts = torch.tensor(self.offsets, dtype=torch.long)
            token_start = torch.arange(self.num_tokens, dtype=torch.long) * self.chunk_size
            chunk = (token_start - starts[layer]) // self.chunk_size
        else:
            chunk = torch.arange(self.num_tokens, dtype=torch.long)
        return torch.stack([layer, chunk], dim=1)

    @functools.cached_property
    def kind_names(self) -> tuple[str, ...]:
        """The distinct layer kinds, sorted: what :attr:`kinds` indexes."""
        return tuple(sorted({spec.kind for spec in self.layers}))

    @functools.cached_property
    def kinds(self) -> torch.Tensor:
        """``[T]`` long: index into :attr:`kind_names` of each token's (first) layer."""
        names = self.kind_names
        kind_of_layer = torch.tensor([names.index(s.kind) for s in self.layers])
        return kind_of_layer[self._layer_of_token]

    # ------------------------------------------------------------------ chunk plans
    def chunk_plan(self, shift: Sequence[float], scale: Sequence[float]) -> ChunkPlan:
        """The op's plan for whole rows (one entry per segment), with per-layer
        ``(x - shift) / scale``."""
        segs = self.segments
        return ChunkPlan(
            tuple(g.count for g in segs), tuple(g.offset for g in segs),
            tuple(g.span for g in segs), tuple(float(shift[g.layer]) for g in segs),
            tuple(float(scale[g.layer]) for g in segs), self.num_tokens, self.chunk_size,
        )  # fmt: skip

    def range_plan(
        self,
        start: int,
        count: int,
        present: Container[int],
        shift: Sequence[float],
        scale: Sequence[float],
    ) -> tuple[ChunkPlan, tuple[RangePart, ...]] | None:
        """The op's plan for tokens ``start .. start + count`` of a row, restricted to the
        layer indices in ``present``, and which part of which layer each segment is; None
        when the range holds no element of them. A segment spans up to the next one; a
        leading empty segment (layer -1) covers padding before the first."""
        T, C = self.num_tokens, self.chunk_size
        if not (is_int(start) and is_int(count) and 0 <= start <= start + count <= T):
            raise ShapeError(
                f"tokens {start} .. {start} + {count} do not lie in the layout's [{T}, {C}]"
            )
        row0, row1 = start * C, (start + count) * C
        segments = []  # (numel, offset in the range's row, shift, scale, part)
        for s, first, n, off, _ in self.segments:
            lo, hi = max(off, row0), min(off + n, row1)
            if s not in present or lo >= hi:
                continue
            if not segments and lo > row0:
                segments.append((0, 0, 0.0, 1.0, RangePart(-1, 0, 0)))
            part = RangePart(s, first + lo - off, hi - lo)
            segments.append((hi - lo, lo - row0, float(shift[s]), float(scale[s]), part))
        if not segments:
            return None
        numel, offset, shifts, scales, parts = zip(*segments)
        span = tuple(b - a for a, b in zip(offset, offset[1:] + (row1 - row0,)))
        plan = ChunkPlan(numel, offset, span, shifts, scales, count, C)
        return plan, tuple(parts)
