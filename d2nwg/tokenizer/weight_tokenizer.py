"""WeightTokenizer: state dicts <-> per-layer normalized chunk tokens ``[N, T, C]``.

The class executes what the other modules describe: the layers of a template
(:mod:`.layers`), their placement in the token row (:class:`~.plan.LayoutPlan`), the
per-layer normalization (:mod:`.statistics`), checked inputs and targets (:mod:`.checks`)
and the file (:mod:`.io`). The heavy lifting is :func:`d2nwg.ops.tokenize` /
:func:`d2nwg.ops.detokenize`, run on the plan's :class:`ChunkPlan`, which is built once per
fitted state (assigning ``mean`` or ``std`` makes the next use rebuild it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch

from d2nwg import ops
from d2nwg.errors import (
    ConfigError,
    D2NWGError,
    DeviceError,
    DTypeError,
    FileFormatError,
    ShapeError,
    shape_of,
)
from d2nwg.ops.tokenize_op import ChunkPlan
from d2nwg.tensors import StateDict, storage_key
from d2nwg.tokenizer import checks, io
from d2nwg.tokenizer.layers import LayerSpec, check_ignored, select_layers
from d2nwg.tokenizer.plan import LayoutPlan, RangePart, check_chunking
from d2nwg.tokenizer.rows import RowClasses, matching_layers, row_classes, row_token_layers
from d2nwg.tokenizer.statistics import fit_moments, normalization, statistics


def _part(t: torch.Tensor, name: str, start: int, count: int) -> torch.Tensor:
    """Elements ``start .. start + count`` of ``t`` in memory order, as a view."""
    if (start, count) == (0, t.numel()):
        return t
    if not t.is_contiguous():
        raise ShapeError(
            f"target[{name!r}] is not contiguous, so it cannot be written a part at a time "
            f"(make it contiguous, or use windows that hold it whole)"
        )
    return t.view(-1)[start : start + count]


def _planned(name: str, doc: str) -> property:
    """A read-only attribute of the tokenizer that is its layout plan's."""
    return property(lambda self: getattr(self.layout_plan, name), doc=doc)


def _state_dicts(state_dicts, message: str) -> Iterable[StateDict]:
    """One mapping as a list of it; any other iterable (not a string or tensor) as is."""
    if isinstance(state_dicts, Mapping):
        return [state_dicts]
    if isinstance(state_dicts, (str, bytes, torch.Tensor)) or not isinstance(state_dicts, Iterable):
        raise DTypeError(f"{message}, got {type(state_dicts).__name__}")
    return state_dicts


class WeightTokenizer:
    """Cuts the weights of a fixed architecture into normalized chunk tokens and back.

    Attributes:
        layers: the tokenized tensors, in token order.
        chunk_size: C, values per token.
        num_tokens: T, tokens per model.
        mask: ``[T, C]`` bool, True where a token element holds a weight (False = padding).
        positions: ``[T, 2]`` long, (layer index, chunk index within the layer; within the
            model for ``granularity="model"``).
        kinds: ``[T]`` long, index into ``kind_names`` of the token's (first) layer.
        mean, std: ``[S]`` float64 per-layer statistics over the zoo (from :meth:`fit`);
            tokens are ``(x - shift) / scale`` with (shift, scale) = normalization(mean, std).
        layout_plan: the :class:`~d2nwg.tokenizer.plan.LayoutPlan` all of the layout
            attributes come from (fixed at construction).
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        chunk_size: int,
        granularity: str = "layer",
        normalize: str | None = "layer",
        ignored: Iterable[str] = (),
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        allow_nonfinite: bool = False,
        row_tokens: Iterable[str] = (),
    ) -> None:
        check_chunking(chunk_size, granularity)
        if normalize not in ("layer", None):
            raise ConfigError(f"normalize must be 'layer' or None, got {normalize!r}")
        if not isinstance(allow_nonfinite, bool):
            raise ConfigError(f"allow_nonfinite must be a bool, got {allow_nonfinite!r}")
        self.layout_plan = LayoutPlan(
            layers, chunk_size, granularity, row_token_layers(layers, row_tokens)
        )
        self.ignored = check_ignored(self.layers, ignored)
        self.normalize = normalize
        self.allow_nonfinite = allow_nonfinite
        self._mean, self._std = statistics(mean, std, len(self.layers))
        self._plan: ChunkPlan | None = None
        self._layer_normalization: tuple[list[float], list[float]] = ([], [])  # (shift, scale)
        self._names = frozenset(n for spec in self.layers for n in (spec.name, *spec.aliases))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: StateDict,
        chunk_size: int = 256,
        granularity: str = "layer",
        normalize: str | None = "layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        allow_nonfinite: bool = False,
        row_tokens: Sequence[str] | None = None,
    ) -> WeightTokenizer:
        """Fix the layout from a template state dict (its order is the token order);
        ``row_tokens``: globs of the tensors whose rows each start a token (class rows)."""
        layers, ignored = select_layers(state_dict, include, exclude)
        rows = [layers[s].name for s in matching_layers(layers, row_tokens or ())]
        return cls(
            layers, chunk_size, granularity, normalize, ignored,
            allow_nonfinite=allow_nonfinite, row_tokens=rows,
        )  # fmt: skip

    # ------------------------------------------------------------------ layout (the plan's)
    layers = _planned("layers", "The tokenized tensors, in token order.")
    chunk_size = _planned("chunk_size", "C, values per token.")
    granularity = _planned("granularity", "'layer' or 'model'.")
    num_tokens = _planned("num_tokens", "T, tokens per model.")
    num_params = _planned("num_params", "Weights per model (tied tensors counted once).")
    mask = _planned("mask", "``[T, C]`` bool, True where a token element holds a weight.")
    positions = _planned("positions", "``[T, 2]`` long, (layer index, chunk index).")
    kinds = _planned("kinds", "``[T]`` long, index into ``kind_names`` of each token.")
    kind_names = _planned("kind_names", "The distinct layer kinds, sorted.")
    token_runs = _planned("token_runs", "Token ranges no token shares with another run.")

    @property
    def row_tokens(self) -> tuple[str, ...]:
        """The tensors whose rows each start a token, in layout order."""
        return tuple(self.layers[s].name for s in sorted(self.layout_plan.row_tokens))

    def row_classes(self, patterns: Sequence[str]) -> RowClasses:
        """The class row each token writes (-1: none) and its chunk index within the row, for
        the tensors ``patterns`` (globs) name: see :mod:`d2nwg.tokenizer.rows`."""
        return row_classes(self.layout_plan, patterns)

    def token_range(self, layers: Iterable[int]) -> tuple[int, int]:
        """The ``[start, stop)`` tokens that hold the elements of the given layer indices."""
        return self.layout_plan.token_range(layers)

    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layers]

    def __repr__(self) -> str:
        return (
            f"WeightTokenizer({len(self.layers)} tensors, {self.num_params} weights -> "
            f"T={self.num_tokens} x C={self.chunk_size}, granularity={self.granularity!r}, "
            f"normalize={self.normalize!r})"
        )

    # ------------------------------------------------------------------ statistics
    @property
    def mean(self) -> torch.Tensor:
        """``[S]`` float64 per-layer mean. Assign a new tensor to change it (the plan is then
        rebuilt); an in-place edit of this one is not seen by a plan already built."""
        return self._mean

    @mean.setter
    def mean(self, value: torch.Tensor) -> None:
        self._mean, self._plan = value, None

    @property
    def std(self) -> torch.Tensor:
        """``[S]`` float64 per-layer std (see :attr:`mean`)."""
        return self._std

    @std.setter
    def std(self, value: torch.Tensor) -> None:
        self._std, self._plan = value, None

    @property
    def plan(self) -> ChunkPlan:
        """The op's plan of the whole row with this tokenizer's normalization; built once per
        fitted state."""
        if self._plan is None:
            shift, scale = normalization(self.mean, self.std)
            self._layer_normalization = (shift.tolist(), scale.tolist())
            self._plan = self.layout_plan.chunk_plan(*self._layer_normalization)
        return self._plan

    def fit(self, state_dicts: Iterable[StateDict]) -> WeightTokenizer:
        """Per-layer mean and std over a zoo, in float64, one state dict at a time.

        ``state_dicts`` may be any iterable (a generator that loads files lazily), so the zoo
        need not fit in memory. Merges per-tensor moments with Chan et al.'s parallel rule.
        """
        state_dicts = _state_dicts(state_dicts, "fit() takes an iterable of state dicts")
        if self.normalize is None:
            return self
        models = (self._sources(sd, n) for n, sd in enumerate(state_dicts))
        self.mean, self.std = fit_moments(models, self.layer_names, self.allow_nonfinite)
        return self

    # ------------------------------------------------------------------ tokens
    def _sources(self, state_dict: StateDict, which: int) -> list[torch.Tensor]:
        """The tensors of one state dict in layout order, after checking keys/shapes/dtypes."""
        return checks.sources(self.layers, (self._names, self.ignored), state_dict, which)

    def tokenize(
        self,
        state_dicts: StateDict | Sequence[StateDict],
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Tokens ``[N, T, C]`` of N state dicts (one mapping gives N = 1), padding zero."""
        state_dicts = _state_dicts(
            state_dicts, "tokenize() takes a state dict or a sequence of them"
        )
        if not isinstance(state_dicts, Sequence):
            state_dicts = list(state_dicts)
        if len(state_dicts) == 0:
            raise ConfigError("tokenize() needs at least one state dict")
        sources = [t.detach() for n, sd in enumerate(state_dicts) for t in self._sources(sd, n)]
        devices = {t.device for t in sources}
        if len(devices) > 1:
            raise DeviceError(
                f"state dict tensors are on several devices: {sorted(map(str, devices))}"
            )
        if self.layout_plan.row_tokens:
            S = len(self.layers)
            sources = [
                v
                for n in range(len(state_dicts))
                for v in self.layout_plan.segment_views(sources[n * S : (n + 1) * S])
            ]
        tokens = ops.tokenize(
            sources, self.plan, num_models=len(state_dicts), dtype=dtype, backend=backend
        )
        if not self.allow_nonfinite:
            checks.check_finite(self.layers, state_dicts, tokens)
        return tokens

    def detokenize(
        self, tokens: torch.Tensor, backend: str | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """State dicts (original names, shapes, dtypes; on the tokens' device) from ``[N, T, C]``.

        Tied names share one tensor, as in the template.
        """
        checks.check_tokens(tokens, 3, self.num_tokens, self.chunk_size)
        N = tokens.shape[0]
        dests = [
            torch.empty(spec.shape, dtype=spec.torch_dtype, device=tokens.device)
            for _ in range(N)
            for spec in self.layers
        ]
        S = len(self.layers)
        views = dests
        if self.layout_plan.row_tokens:
            split = self.layout_plan.segment_views
            views = [v for n in range(N) for v in split(dests[n * S : (n + 1) * S])]
        ops.detokenize(tokens, views, self.plan, backend=backend)
        out = []
        for n in range(N):
            sd: dict[str, torch.Tensor] = {}
            for spec, t in zip(self.layers, dests[n * S : (n + 1) * S]):
                sd[spec.name] = t
                sd.update(dict.fromkeys(spec.aliases, t))
            out.append(sd)
        return out

    # ------------------------------------------------------------------ writing into targets
    def detokenize_into(
        self,
        target: torch.nn.Module | dict[str, torch.Tensor],
        tokens: torch.Tensor,
        backend: str | None = None,
    ):
        """Write one model's tokens ``[T, C]`` in place into a module or a state dict.

        No full-size intermediate: the kernel scatters straight into the parameter tensors
        (cast to each destination's dtype). Returns ``target``.
        """
        checks.check_tokens(tokens, 2, self.num_tokens, self.chunk_size)
        dests = self.destinations(target)
        self.write_range(dests, tokens, 0, backend=backend)
        self.copy_aliases(dests)
        return target

    def destinations(
        self, target: torch.nn.Module | Mapping[str, torch.Tensor], partial: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors of ``target`` (a module or a state dict) that the layout writes, by
        name (tied copies included), each checked before any is written, so that a bad one
        never leaves the target half-overwritten. ``partial=True`` allows a subset of the
        layout (one shard of a model)."""
        return checks.destinations(self.layers, target, partial)

    def write_range(
        self,
        dests: Mapping[str, torch.Tensor],
        tokens: torch.Tensor,
        start: int,
        accumulate: bool = False,
        backend: str | None = None,
    ) -> None:
        """De-normalize tokens ``[n, C]``, the tokens ``start .. start + n`` of one model, into
        the parts of ``dests`` (from :meth:`destinations`) that they hold; layers missing
        from ``dests`` are skipped. ``accumulate=True`` adds to the destinations instead
        (``weights = base + generated``). Streaming generation writes a model this way, one
        batch of windows at a time; a layer split across ranges must be contiguous."""
        C = self.chunk_size
        ok = isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[1] == C
        n = tokens.shape[0] if ok else 0
        if not ok or not 0 <= start <= start + n <= self.num_tokens:
            raise ShapeError(
                f"tokens {shape_of(tokens)} from token {start} do not lie in the layout's "
                f"[{self.num_tokens}, {C}]"
            )
        if not dests:
            return
        present = {s for s, spec in enumerate(self.layers) if spec.name in dests}
        self.plan  # noqa: B018  (builds the per-layer normalization, once per fitted state)
        ranged = self.layout_plan.range_plan(start, n, present, *self._layer_normalization)
        if ranged is None:
            return
        plan, parts = ranged
        device = next(iter(dests.values())).device
        views = [self._view(dests, part, device) for part in parts]
        out = [torch.empty_like(v) for v in views] if accumulate else views
        with torch.no_grad():
            ops.detokenize(tokens.to(device)[None], out, plan, backend=backend)
            if accumulate:
                for view, value in zip(views, out):
                    view.add_(value)

    def _view(self, dests: Mapping[str, torch.Tensor], part: RangePart, device) -> torch.Tensor:
        """The memory a range plan's segment writes: a part of a destination, or nothing."""
        if part.layer < 0:
            return torch.empty(0, device=device)
        name = self.layers[part.layer].name
        return _part(dests[name], name, part.start, part.count)

    def copy_aliases(self, dests: Mapping[str, torch.Tensor]) -> None:
        """Untied copies in a target get the values of the tensor they are tied to."""
        with torch.no_grad():
            for spec in self.layers:
                for alias in spec.aliases:
                    if alias in dests and spec.name in dests:
                        if storage_key(dests[alias]) != storage_key(dests[spec.name]):
                            dests[alias].copy_(dests[spec.name])

    # ------------------------------------------------------------------ files
    def _layout(self) -> dict:
        return io.layout_json(
            self.layers, self.chunk_size, self.granularity, self.normalize,
            self.allow_nonfinite, self.ignored, self.row_tokens,
        )  # fmt: skip

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: statistics as tensors, the layout as JSON metadata.

        Written to a temporary file and renamed, so no half-written file is ever left.
        """
        io.save(path, self._layout(), self.mean, self.std)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeightTokenizer:
        """Load a file written by :meth:`save`; a bad file raises :class:`FileFormatError`
        naming the file and the field. Sizes are checked against the MAX_* limits
        (:mod:`d2nwg.tokenizer.limits`) before anything is allocated; nothing is unpickled."""
        path = os.fspath(path)
        args = io.read(path)
        try:
            return cls(**args)
        except D2NWGError as exc:  # ConfigError, ShapeError, ...: what is wrong, with the file
            raise FileFormatError(f"{path}: invalid tokenizer layout: {exc}") from exc
