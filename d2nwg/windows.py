"""Windows: a large model's token sequence, cut into pieces the denoiser sees one at a time.

Two layouts, both of W-token windows over the tokenizer's sequence of T tokens:

- **Overlapping** (``stride < W``, what ``D2NWGConfig.resolve`` picks: ``stride = W // 2``).
  Windows start every ``stride`` tokens (the last one ends at T) and span layers freely: every
  token carries its own (layer, chunk) position and layer kind. Sampling keeps the latent
  sequence of the whole model ``[B, T, d]`` and at every sampler step denoises all windows
  and averages each token's predictions over the windows holding it (MultiDiffusion), so
  neighbouring windows agree on the tokens they share and, step by step, on the whole model.
  Training draws windows at every offset (:meth:`WindowLayout.for_training`).
- **Aligned** (``stride`` 0 or at least W: windows that do not overlap). A layer of at least W
  tokens is cut into ``ceil(n / W)`` windows of its own (the last one short); smaller layers
  are packed whole, in order, into shared windows while they fit. Every token lies in exactly
  one window, which is sampled on its own. Short windows are padded at the end; ``mask``
  says which slots are real.

A sequence of at most W tokens is one window without padding (the model-level generator),
whatever the stride.

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


def slide_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``window`` tokens every ``stride`` tokens over
    ``num_tokens`` (the last one moved back to end at ``num_tokens``; one range when the
    sequence fits a window)."""
    if num_tokens <= window:
        return [(0, num_tokens)]
    starts = list(range(0, num_tokens - window + 1, stride))
    if starts[-1] + window < num_tokens:
        starts.append(num_tokens - window)
    return [(a, a + window) for a in starts]


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
        stride: tokens between window starts when the windows overlap (``< size``); 0 for
            the aligned layout (windows that do not overlap).
        spans: ``[start, stop)`` tokens of each window.
        index: ``[NW, W]`` long, the token in each slot (T, the token count, for padding).
        mask: ``[NW, W]`` bool, True for real slots.
        positions: ``[NW, W, 2]`` long, (layer index, chunk index) of each slot (0 for padding).
        kinds: ``[NW, W]`` long, layer kind of each slot (0 for padding).
        cover: ``[T, K]`` long, for each token the flat slots ``window * W + slot`` that hold
            it (K: the most windows any token lies in; ``NW * W``, a zero slot, fills the rest).
        cover_weight: ``[T, K]`` float32, each slot's share of the token's average (rows sum
            to 1; 0 for fillers).
        class_rows: the globs of the tensors whose rows follow the condition's classes.
        classes: ``[NW, W]`` long, the class row of each slot (-1: none, and for padding),
            or None when no tensor is named by ``class_rows``.
    """

    size: int
    stride: int
    spans: tuple[tuple[int, int], ...]
    index: torch.Tensor = field(repr=False)
    mask: torch.Tensor = field(repr=False)
    positions: torch.Tensor = field(repr=False)
    kinds: torch.Tensor = field(repr=False)
    cover: torch.Tensor = field(repr=False)
    cover_weight: torch.Tensor = field(repr=False)
    num_tokens: int = field(repr=False)
    tokenizer: object = field(repr=False, compare=False)
    class_rows: tuple[str, ...] = ()
    classes: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        window: int = 0,
        stride: int = 0,
        class_rows: Sequence[str] | None = None,
    ) -> WindowLayout:
        """Windows of ``window`` tokens (0, or at least the sequence: one window of it all);
        ``stride`` in ``[1, window)``: overlapping windows that start every ``stride`` tokens,
        else (0, or at least ``window``) the aligned layout."""
        for name, v in (("window", window), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {v!r}")
        T = tokenizer.num_tokens
        W = T if window == 0 or window >= T else window
        stride = stride if 0 < stride < W else 0
        if stride:
            spans = slide_windows(T, W, stride)
        else:
            spans = cut_windows(tokenizer.token_runs, W)
        return cls._build(tokenizer, W, stride, tuple(spans), tuple(class_rows or ()))

    @classmethod
    def _build(
        cls, tokenizer, W: int, stride: int, spans: tuple, class_rows: tuple[str, ...] = ()
    ) -> WindowLayout:
        T = tokenizer.num_tokens
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
        cover, weight = _cover(index, mask, T)
        return cls(W, stride, spans, index, mask, pos[index], kinds[index], cover, weight, T,
                   tokenizer, class_rows, classes)  # fmt: skip

    @property
    def num_windows(self) -> int:
        return len(self.spans)

    @property
    def overlapping(self) -> bool:
        return self.stride > 0

    @property
    def padded(self) -> bool:
        """Whether any window has padding slots (the denoiser then needs the mask)."""
        return not bool(self.mask.all())

    def for_training(self) -> WindowLayout:
        """The windows diffusion training draws from: for overlapping windows, one at every
        offset (stride 1), so the denoiser sees every alignment sampling can give it; else
        these windows."""
        if not self.overlapping:
            return self
        return self._build(self.tokenizer, self.size, 1,
                           tuple(slide_windows(self.num_tokens, self.size, 1)),
                           self.class_rows)  # fmt: skip

    def noise_blocks(self) -> list[tuple[int, int]]:
        """``[start, stop)`` token blocks that each draw their starting noise from a generator
        of their own: the windows when aligned (so a window's noise is what it was when
        windows were sampled one by one), else W consecutive tokens from token 0."""
        if not self.overlapping:
            return list(self.spans)
        T, W = self.num_tokens, self.size
        return [(a, min(a + W, T)) for a in range(0, T, W)]

    def denoiser_layout(self) -> dict[str, torch.Tensor | None]:
        """Every window's layout keywords of :class:`d2nwg.LatentDenoiser`, ``[NW, W, ...]``:
        positions, layer kinds, the padding mask (None when no window is padded) and, with
        class rows, each slot's ``class_index``."""
        mask = self.mask if self.padded else None
        layout = {"positions": self.positions, "layer_kinds": self.kinds, "mask": mask}
        if self.classes is not None:
            layout["class_index"] = self.classes
        return layout

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The windows ``[B, NW, W, d]`` of latent sequences ``x [B, T, d]`` (padding: 0)."""
        if self.padded:
            x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], 1)
        return x[:, self.index.to(x.device)]

    def blend_plan(self, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """What :meth:`blend` indexes with, on ``device``: for each k < K, the tokens that lie
        in more than k windows, the flat slot of their k-th window and its weight."""
        plan = []
        for k in range(self.cover.shape[1]):
            tokens = torch.nonzero(self.cover_weight[:, k] > 0).squeeze(1)
            parts = (tokens, self.cover[tokens, k], self.cover_weight[tokens, k])
            plan.append(tuple(p.to(device) for p in parts))
        return plan

    def slot_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot ``[NW, W]``: which of its token's windows this one is (0 for the first,
        -1 for padding) and its weight in the token's average (0 for padding)."""
        NW, W = self.index.shape
        rank = torch.full((NW * W + 1,), -1, dtype=torch.long)
        weight = torch.zeros(NW * W + 1)
        K = self.cover.shape[1]
        rank[self.cover] = torch.arange(K).expand_as(self.cover)
        weight[self.cover] = self.cover_weight
        return rank[:-1].view(NW, W), weight[:-1].view(NW, W)

    def blend(self, pred: torch.Tensor, plan: list | None = None) -> torch.Tensor:
        """Each token's average over the windows that hold it: ``[B, T, d]`` from per-window
        predictions ``[B, NW, W, d]`` (``plan``: :meth:`blend_plan` on their device, made
        once by a caller that blends every step). A token of one window gets that window's
        value exactly; the terms are added in window order, so the result does not depend on
        how the windows were batched."""
        B, d = pred.shape[0], pred.shape[-1]
        flat = pred.reshape(B, -1, d)
        (_, slot, weight), *rest = plan or self.blend_plan(pred.device)
        out = flat[:, slot]  # every token lies in a window: rank 0 is every token, in order
        if rest:
            out *= weight.to(out.dtype)[:, None]
        for tokens, slot, weight in rest:  # unique tokens: the same sum on any device
            out.index_add_(1, tokens, flat[:, slot] * weight.to(out.dtype)[:, None])
        return out

    def token_batches(self, start: int, stop: int, batch: int) -> list[tuple[int, int]]:
        """Tokens ``[start, stop)`` in consecutive ranges of at most ``batch`` windows'
        tokens: what streaming decodes and writes at once. Aligned windows stay whole (a
        batch is a run of consecutive windows); overlapping ones cut at multiples of
        ``batch * W`` from token 0, the same cuts whatever range is asked."""
        if self.overlapping:
            step = batch * self.size
            cuts = range((start // step + 1) * step, stop, step)
            edges = [start, *cuts, stop]
            return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
        first, end = self.covering(start, stop)
        out = []
        for w in range(first, end, batch):
            a, b = self.spans[w][0], self.spans[min(w + batch, end) - 1][1]
            out.append((max(a, start), min(b, stop)))
        return out

    def covering(self, start: int, stop: int) -> tuple[int, int]:
        """Windows ``[first, stop)`` that hold any token of ``[start, stop)``."""
        first = next(w for w, (_, b) in enumerate(self.spans) if b > start)
        last = max(w for w, (a, _) in enumerate(self.spans) if a < stop)
        return first, last + 1


def _cover(index: torch.Tensor, mask: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For :class:`WindowLayout`: each token's flat slots ``[T, K]`` (ascending window
    order; ``NW * W`` fills) and their uniform weights ``[T, K]``."""
    NW, W = index.shape
    flat = torch.arange(NW * W, dtype=torch.long)[mask.flatten()]
    token = index.flatten()[mask.flatten()]
    order = torch.argsort(token * (NW * W) + flat)  # by token, then by window
    token, flat = token[order], flat[order]
    count = torch.bincount(token, minlength=T)
    K = int(count.max()) if count.numel() else 1
    rank = torch.arange(token.numel()) - (torch.cumsum(count, 0) - count)[token]
    cover = torch.full((T, K), NW * W, dtype=torch.long)
    cover[token, rank] = flat
    weight = torch.zeros(T, K, dtype=torch.float32)
    weight[token, rank] = 1.0 / count[token].float()
    return cover, weight
