"""Windows: a large model's token sequence, cut into pieces the denoiser sees one at a time.

A window holds W consecutive tokens of the tokenizer's sequence. A layer of at least W tokens
is cut into ``ceil(n / W)`` windows of its own (the last one short); smaller layers are packed
whole, in order, into shared windows while they fit. So a window never spans two layers
unless those layers are smaller than a window, every token lies in exactly one window, and
the windows of consecutive indices cover consecutive tokens (a batch of windows is one
token range, which streaming generation writes in one call). Short windows are padded at
the end; ``mask`` says which slots are real.

Each window carries its tokens' layout (layer index, chunk offset and layer kind, from
:class:`d2nwg.WeightTokenizer`), so the denoiser knows where in the model it sits. A
sequence of at most W tokens is one window without padding: the model-level generator.

With ``class_rows`` (globs of the tensors whose dim-0 rows follow the condition's classes,
:mod:`d2nwg.tokenizer.rows`) a window also carries each slot's class row (-1: none), and the
tokens of a class row are placed by their chunk within the row, not within the layer, so
that nothing but the class tells row k from row j.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from d2nwg.errors import ConfigError


def cut_windows(runs: list[tuple[int, int]], window: int) -> list[tuple[int, int]]:
    """``[start, stop)`` token ranges of the windows over ``runs`` (disjoint, ascending
    ``[start, stop)`` ranges that must not be mixed unless each is shorter than ``window``)."""
    out: list[tuple[int, int]] = []
    packed: list[int] | None = None  # the open window of small runs: [start, stop]
    for a, b in runs:
        if b - a >= window:
            if packed:
                out.append(tuple(packed))
                packed = None
            out.extend((s, min(s + window, b)) for s in range(a, b, window))
        elif packed and b - packed[0] <= window and a == packed[1]:
            packed[1] = b
        else:
            if packed:
                out.append(tuple(packed))
            packed = [a, b]
    if packed:
        out.append(tuple(packed))
    return out


@dataclass(frozen=True)
class WindowLayout:
    """The windows of one tokenizer layout.

    Attributes:
        size: W, token slots per window.
        spans: ``[start, stop)`` tokens of each window.
        index: ``[NW, W]`` long, the token in each slot (T, the token count, for padding).
        mask: ``[NW, W]`` bool, True for real slots.
        positions: ``[NW, W, 2]`` long, (layer index, chunk index) of each slot (0 for padding).
        kinds: ``[NW, W]`` long, layer kind of each slot (0 for padding).
        classes: ``[NW, W]`` long, the class row of each slot (-1: none, and for padding),
            or None when no tensor is named by ``class_rows``.
    """

    size: int
    spans: tuple[tuple[int, int], ...]
    index: torch.Tensor = field(repr=False)
    mask: torch.Tensor = field(repr=False)
    positions: torch.Tensor = field(repr=False)
    kinds: torch.Tensor = field(repr=False)
    classes: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_tokenizer(
        cls, tokenizer, window: int = 0, class_rows: Sequence[str] | None = None
    ) -> WindowLayout:
        """Windows of ``window`` tokens (0, or at least the sequence: one window of it all);
        ``class_rows``: globs of the tensors whose rows follow the condition's classes."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ConfigError(f"window must be an int >= 0, got {window!r}")
        T = tokenizer.num_tokens
        W = T if window == 0 or window >= T else window
        spans = tuple(cut_windows(tokenizer.token_runs, W))
        starts = torch.tensor([a for a, _ in spans], dtype=torch.long)
        lengths = torch.tensor([b - a for a, b in spans], dtype=torch.long)
        slot = torch.arange(W, dtype=torch.long)
        mask = slot[None, :] < lengths[:, None]
        index = torch.where(
            mask, starts[:, None] + slot[None, :], torch.full_like(mask, T, dtype=torch.long)
        )
        positions, classes = tokenizer.positions, None
        if class_rows:
            rows = tokenizer.row_classes(class_rows)
            positions = torch.stack([positions[:, 0], rows.chunk], dim=1)
            classes = torch.cat([rows.index, rows.index.new_full((1,), -1)])[index]
        pos = torch.cat([positions, positions.new_zeros(1, 2)])
        kinds = torch.cat([tokenizer.kinds, tokenizer.kinds.new_zeros(1)])
        return cls(W, spans, index, mask, pos[index], kinds[index], classes)

    @property
    def num_windows(self) -> int:
        return len(self.spans)

    @property
    def padded(self) -> bool:
        """Whether any window has padding slots (the denoiser then needs the mask)."""
        return not bool(self.mask.all())

    def denoiser_layout(self) -> dict[str, torch.Tensor | None]:
        """Every window's layout keywords of :class:`d2nwg.LatentDenoiser`, ``[NW, W, ...]``:
        positions, layer kinds, the padding mask (None when no window is padded) and, with
        class rows, each slot's ``class_index``."""
        mask = self.mask if self.padded else None
        layout = {"positions": self.positions, "layer_kinds": self.kinds, "mask": mask}
        if self.classes is not None:
            layout["class_index"] = self.classes
        return layout

    def covering(self, start: int, stop: int) -> tuple[int, int]:
        """Windows ``[first, stop)`` that hold any token of ``[start, stop)``."""
        first = next(w for w, (_, b) in enumerate(self.spans) if b > start)
        last = max(w for w, (a, _) in enumerate(self.spans) if a < stop)
        return first, last + 1

    def batches(self, first: int, stop: int, batch: int) -> list[tuple[int, int]]:
        """Windows ``[first, stop)`` in consecutive batches of at most ``batch``."""
        return [(w, min(w + batch, stop)) for w in range(first, stop, batch)]
