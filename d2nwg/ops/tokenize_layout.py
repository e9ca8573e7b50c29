"""The layout of fused chunk tokenization: :class:`ChunkPlan`, where each parameter tensor lives
in a model's token row (see :mod:`d2nwg.ops.tokenize_op` for the op and its arithmetic).

Shared by the op module and its Triton kernels (``kernels/tokenize.py``), and importing neither,
so that the kernels need not import the op module back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from d2nwg.errors import ConfigError

# Largest element count or offset a plan may hold: far beyond any real model, far below
# where int64 sums of two of them could wrap in the compiled kernels.
MAX_ELEMENTS = 2**48


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ChunkPlan:
    """Placement of S segments in a token row of ``num_tokens * chunk_size`` elements."""

    numel: tuple[int, ...]
    offset: tuple[int, ...]
    span: tuple[int, ...]
    shift: tuple[float, ...]
    scale: tuple[float, ...]
    num_tokens: int
    chunk_size: int
    rscale: tuple[float, ...] = field(init=False)
    unshift: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        for name in ("numel", "offset", "span", "shift", "scale"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ConfigError(f"ChunkPlan: {name} must be a tuple, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        # Every count is a true int (bool is not one) that fits the kernels' int64 arithmetic
        # with room to spare: no sum or product below can wrap in a compiled backend.
        for name in ("numel", "offset", "span"):
            for v in getattr(self, name):
                if not _is_int(v) or not 0 <= v <= MAX_ELEMENTS:
                    raise ConfigError(
                        f"ChunkPlan: {name} entry {v!r} is not an int in [0, {MAX_ELEMENTS}]"
                    )
        for name in ("shift", "scale"):
            for v in getattr(self, name):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"ChunkPlan: {name} entry {v!r} is not a finite number")
        for name in ("num_tokens", "chunk_size"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= MAX_ELEMENTS:
                raise ConfigError(f"ChunkPlan: {name} {v!r} is not an int in [0, {MAX_ELEMENTS}]")
        if self.row_size > MAX_ELEMENTS:
            raise ConfigError(
                f"ChunkPlan: a row of {self.num_tokens} x {self.chunk_size} "
                f"elements exceeds {MAX_ELEMENTS}"
            )
        S = len(self.numel)
        if not (len(self.offset) == len(self.span) == len(self.shift) == len(self.scale) == S):
            raise ConfigError(
                f"ChunkPlan: numel, offset, span, shift, scale need one entry per "
                f"segment, got {len(self.numel)}, {len(self.offset)}, "
                f"{len(self.span)}, {len(self.shift)}, {len(self.scale)}"
            )
        if self.chunk_size < 1 or self.num_tokens < 0:
            raise ConfigError(
                f"ChunkPlan: chunk_size {self.chunk_size} / num_tokens "
                f"{self.num_tokens} out of range"
            )
        end = 0
        for s in range(S):  # the spans tile the row: every token element written exactly once
            if self.offset[s] != end or not 0 <= self.numel[s] <= self.span[s]:
                raise ConfigError(
                    f"ChunkPlan: segment {s} (offset {self.offset[s]}, numel "
                    f"{self.numel[s]}, span {self.span[s]}) does not follow on "
                    f"element {end} with numel <= span"
                )
            end += self.span[s]
        if end != self.row_size:
            raise ConfigError(
                f"ChunkPlan: spans cover {end} elements, the row has "
                f"{self.row_size} (num_tokens * chunk_size)"
            )
        if not all(math.isfinite(s) and s != 0 for s in self.scale):
            raise ConfigError("ChunkPlan: every scale must be finite and nonzero")
        object.__setattr__(self, "rscale", tuple(1.0 / s for s in self.scale))
        # A zero shift is stored as +0.0: x - (+0.0) == x for every x, so -0.0 weights keep
        # their sign (x - (-0.0) made them +0.0, and the round trip lost them). Plans that
        # compare equal (-0.0 == 0.0) then also compute the same bits, which the caches keyed
        # by plan (tokenize_op._cached_plan, the Triton launchers' tables) rely on.
        object.__setattr__(self, "shift", tuple(m if m != 0 else 0.0 for m in self.shift))
        # The shift detokenize adds back, with 0 spelled -0.0: v + (-0.0) == v for every v, so
        # an unshifted layer's -0.0 weights come back as -0.0 (v + 0.0 would make them +0.0).
        object.__setattr__(self, "unshift", tuple(m if m != 0 else -0.0 for m in self.shift))

    @property
    def row_size(self) -> int:
        return self.num_tokens * self.chunk_size

    @property
    def num_segments(self) -> int:
        return len(self.numel)
