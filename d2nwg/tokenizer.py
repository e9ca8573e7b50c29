"""WeightTokenizer: state dicts <-> per-layer normalized chunk tokens ``[N, T, C]``.

The layout is fixed by a template state dict: which tensors are tokenized (every floating
tensor but BatchNorm running statistics, unless ``include`` / ``exclude`` globs say
otherwise), in which order, and where each lands in the token sequence:

- ``granularity="layer"``: each tensor is padded to whole chunks, so no token mixes layers;
- ``granularity="model"``: all tensors are concatenated and padded once at the end.

Tensors that share storage in the template (tied weights) are tokenized once and restored
to every name. ``fit`` streams over a zoo to get each layer's mean and std (float64); the
heavy lifting is :func:`d2nwg.ops.tokenize` / :func:`d2nwg.ops.detokenize`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from d2nwg import ops
from d2nwg.errors import (
    ConfigError,
    D2NWGError,
    DeviceError,
    DTypeError,
    FileFormatError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
    shape_of,
)
from d2nwg.files import parse_json_metadata, read_safetensors, save_safetensors
from d2nwg.ops.tokenize_op import FLOAT_DTYPES, ChunkPlan, check_data_tensor

_FLOAT_DTYPE_NAMES = frozenset(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)

FORMAT = "d2nwg.WeightTokenizer"
FORMAT_VERSION = 1
# BatchNorm running statistics are state, not learned weights.
DEFAULT_EXCLUDE = ("*running_mean", "*running_var", "*num_batches_tracked")
StateDict = Mapping[str, torch.Tensor]
CENTER_THRESHOLD = 0.5  # center a layer when |mean| >= this * std
# Size limits, checked before anything is allocated (a file that names a [2^20, 2^20] layer
# or a chunk size of 2^40 is refused, not attempted). Generous for real models; raise them
# at module level if you mean it.
MAX_CHUNK_SIZE = 2**20  # values per token
MAX_NUM_TOKENS = 2**24  # tokens per model (positions/kinds cost 24 bytes each)
MAX_NUM_PARAMS = 2**36  # weights per model, tied tensors counted once
MAX_LAYERS = 2**20  # tensors in a layout (names and aliases)
MAX_RANK = 64  # dimensions of one tensor


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_kind(name: str, shape: tuple[int, ...]) -> str:
    """A coarse kind shared by alike tensors across layers: rank and last name part."""
    return f"{len(shape)}d.{name.rsplit('.', 1)[-1]}"


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views. The storage is named by its StorageImpl, not its
    address: every meta tensor (and every empty storage) has address 0, so addresses would
    tie unrelated tensors of the same shape."""
    return (
        t.device,
        t.untyped_storage()._cdata,
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
    )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (NaN == NaN, -0.0 != +0.0): what a tie must hold."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    if storage_key(a) == storage_key(b):
        return True
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.to(a.device).view(bits))


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_layers(layers: Sequence, ignored: frozenset) -> None:
    """Types, sizes and names of a layout, before anything is allocated for it."""
    if len(layers) > MAX_LAYERS:
        raise ConfigError(f"{len(layers)} layers, more than MAX_LAYERS = {MAX_LAYERS}")
    seen: set[str] = set()
    for i, spec in enumerate(layers):
        if not isinstance(spec, LayerSpec):
            raise ConfigError(f"layers[{i}] is a {type(spec).__name__}, not a LayerSpec")
        if not isinstance(spec.name, str):
            raise ConfigError(f"layers[{i}].name must be a string, got {spec.name!r}")
        where = f"layer {spec.name!r}"
        if (
            not isinstance(spec.shape, tuple)
            or len(spec.shape) > MAX_RANK
            or not all(_is_int(n) and 0 <= n <= MAX_NUM_PARAMS for n in spec.shape)
        ):
            raise ConfigError(
                f"{where}: shape must be at most {MAX_RANK} ints in "
                f"[0, {MAX_NUM_PARAMS}], got {spec.shape!r}"
            )
        numel = 1
        for n in spec.shape:  # stops growing past the limit: no huge intermediate integers
            numel = min(numel * n, MAX_NUM_PARAMS + 1)
        if numel > MAX_NUM_PARAMS:
            raise ConfigError(
                f"{where}: shape {spec.shape} holds more than MAX_NUM_PARAMS = "
                f"{MAX_NUM_PARAMS} weights"
            )
        if spec.dtype not in _FLOAT_DTYPE_NAMES:
            raise ConfigError(
                f"{where}: dtype {spec.dtype!r} is not one of {sorted(_FLOAT_DTYPE_NAMES)}"
            )
        if not isinstance(spec.kind, str):
            raise ConfigError(f"{where}: kind must be a string, got {spec.kind!r}")
        if not isinstance(spec.aliases, tuple) or not all(isinstance(a, str) for a in spec.aliases):
            raise ConfigError(f"{where}: aliases must be strings, got {spec.aliases!r}")
        for name in (spec.name,) + spec.aliases:
            if name in seen:
                raise ConfigError(f"the name {name!r} appears twice in the layout")
            if name in ignored:
                raise ConfigError(f"the name {name!r} is both tokenized and ignored")
            seen.add(name)
    if not all(isinstance(name, str) for name in ignored):
        raise ConfigError("ignored names must be strings")


def _stat(value, name: str, S: int) -> torch.Tensor:
    """Per-layer mean or std: a finite floating tensor [S], as float64."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise DTypeError(f"{name} must be a dense tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise DTypeError(f"{name} has dtype {value.dtype}; expected a floating dtype")
    if tuple(value.shape) != (S,):
        raise ShapeError(
            f"{name} must have shape [{S}] (one entry per layer), got {tuple(value.shape)}"
        )
    value = value.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return value


def normalization(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (shift, scale) each layer is normalized with, from its zoo mean and std.

    Chosen so that round trips stay exact where a float32 token can hold the weight:
    - scale is std rounded to a power of two, so dividing by it is exact;
    - a layer is centered only where its mean matters (|mean| >= std / 2, e.g. norm weights
      around 1); elsewhere shift = 0 and x -> x / scale -> x is exact in every dtype;
    - shift keeps 8 significant bits (bfloat16's), so x - shift is exact for 16-bit weights
      within 2^15 of it in magnitude, and a zero weight comes back as exactly zero.
    Tokens still have per-layer mean ~0 and std in [0.7, 1.4].
    """
    scale = torch.exp2(torch.round(torch.log2(std)))
    centered = mean.abs() >= CENTER_THRESHOLD * std
    shift = torch.where(centered, mean.to(torch.bfloat16).double(), torch.zeros_like(mean))
    return shift, scale


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
    ) -> None:
        if (
            isinstance(chunk_size, bool)
            or not isinstance(chunk_size, int)
            or not 1 <= chunk_size <= MAX_CHUNK_SIZE
        ):
            raise ConfigError(
                f"chunk_size must be an int in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}"
            )
        if granularity not in ("layer", "model"):
            raise ConfigError(f"granularity must be 'layer' or 'model', got {granularity!r}")
        if normalize not in ("layer", None):
            raise ConfigError(f"normalize must be 'layer' or None, got {normalize!r}")
        if not isinstance(allow_nonfinite, bool):
            raise ConfigError(f"allow_nonfinite must be a bool, got {allow_nonfinite!r}")
        if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence):
            raise ConfigError(
                f"layers must be a sequence of LayerSpec, got {type(layers).__name__}"
            )
        if not layers:
            raise ConfigError("no tensor selected for tokenization (check include/exclude)")
        if isinstance(ignored, (str, bytes)):
            raise ConfigError(f"ignored must be a collection of names, got {ignored!r}")
        ignored = frozenset(ignored)
        _check_layers(layers, ignored)
        self.layers = tuple(layers)
        self.chunk_size = chunk_size
        self.granularity = granularity
        self.normalize = normalize
        self.ignored = ignored
        self.allow_nonfinite = allow_nonfinite
        S = len(self.layers)
        self.mean = torch.zeros(S, dtype=torch.float64) if mean is None else _stat(mean, "mean", S)
        self.std = torch.ones(S, dtype=torch.float64) if std is None else _stat(std, "std", S)
        if not bool((self.std > 0).all()):
            raise ConfigError("std must be positive (fit() gives constant layers std 1)")
        numel = [spec.numel for spec in self.layers]
        total = sum(numel)
        if total > MAX_NUM_PARAMS:
            raise ConfigError(
                f"the layout holds {total} weights per model, more than "
                f"d2nwg.tokenizer.MAX_NUM_PARAMS = {MAX_NUM_PARAMS}"
            )
        C = chunk_size
        T = sum(-(-n // C) for n in numel) if granularity == "layer" else -(-total // C)
        if T > MAX_NUM_TOKENS:
            raise ConfigError(
                f"the layout needs {T} tokens of {C} values per model, more than "
                f"d2nwg.tokenizer.MAX_NUM_TOKENS = {MAX_NUM_TOKENS} (use a larger "
                f"chunk_size)"
            )
        self._index = {spec.name: i for i, spec in enumerate(self.layers)}
        self._aliases = {a: spec.name for spec in self.layers for a in spec.aliases}
        self._place()

    # ------------------------------------------------------------------ layout
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
    ) -> WeightTokenizer:
        """Fix the layout from a template state dict (its order is the token order)."""
        if not isinstance(state_dict, Mapping):
            raise DTypeError(
                f"the template must be a state dict (a mapping of names to "
                f"tensors), got {type(state_dict).__name__}"
            )
        for name, patterns in (("include", include), ("exclude", exclude)):
            # a bare string would be iterated as single-character patterns ('*' matches all)
            if patterns is not None and (
                isinstance(patterns, (str, bytes)) or not all(isinstance(p, str) for p in patterns)
            ):
                raise ConfigError(f"{name} must be a list of glob patterns, got {patterns!r:.80}")
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
            if not selected:
                ignored.append(name)
                continue
            if t.layout != torch.strided:
                raise DTypeError(
                    f"state_dict[{name!r}] has layout {t.layout}; only dense "
                    f"(strided) tensors can be tokenized"
                )
            if t.dtype not in FLOAT_DTYPES:
                if include is not None:  # asked for by name: say why it cannot be
                    raise DTypeError(
                        f"state_dict[{name!r}] has dtype {t.dtype}; only floating "
                        f"tensors {FLOAT_DTYPES} can be tokenized"
                    )
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
            layers.append(
                LayerSpec(name, shape, _dtype_name(t.dtype), (), _layer_kind(name, shape))
            )
        if not layers:
            raise ConfigError(
                f"no floating tensor of the {len(state_dict)} in the state dict "
                f"is selected (include={include}, exclude={list(exclude)})"
            )
        return cls(
            layers, chunk_size, granularity, normalize, ignored, allow_nonfinite=allow_nonfinite
        )

    def _place(self) -> None:
        """Offsets, spans, token count, mask, positions and kinds from the layers."""
        C = self.chunk_size
        numel = [spec.numel for spec in self.layers]
        if self.granularity == "layer":
            spans = [-(-n // C) * C for n in numel]
        else:
            total = sum(numel)
            spans = numel[:-1] + [numel[-1] + (-(-total // C) * C - total)]
        offsets = [0]
        for span in spans[:-1]:
            offsets.append(offsets[-1] + span)
        self.num_tokens = sum(spans) // C
        self._offsets, self._spans, self._numel = tuple(offsets), tuple(spans), tuple(numel)

        T = self.num_tokens
        self._mask = None  # built on first use (T * C bytes)
        # A token belongs to the layer its first element belongs to (empty layers own none).
        starts = torch.tensor(offsets, dtype=torch.long)
        token_start = torch.arange(T, dtype=torch.long) * C
        layer_of_token = torch.searchsorted(starts, token_start, right=True) - 1
        if self.granularity == "layer":
            chunk_idx = (token_start - starts[layer_of_token]) // C
        else:
            chunk_idx = torch.arange(T, dtype=torch.long)
        self.positions = torch.stack([layer_of_token, chunk_idx], dim=1)
        self.kind_names = tuple(sorted({spec.kind for spec in self.layers}))
        kind_of_layer = torch.tensor([self.kind_names.index(s.kind) for s in self.layers])
        self.kinds = kind_of_layer[layer_of_token]

    @property
    def mask(self) -> torch.Tensor:
        """``[T, C]`` bool, True where a token element holds a weight (False = padding)."""
        if self._mask is None:
            flat = torch.zeros(self.num_tokens * self.chunk_size, dtype=torch.bool)
            for off, n in zip(self._offsets, self._numel):
                flat[off : off + n] = True
            self._mask = flat.view(self.num_tokens, self.chunk_size)
        return self._mask

    @property
    def plan(self) -> ChunkPlan:
        shift, scale = normalization(self.mean, self.std)
        return ChunkPlan(
            self._numel,
            self._offsets,
            self._spans,
            tuple(shift.tolist()),
            tuple(scale.tolist()),
            self.num_tokens,
            self.chunk_size,
        )

    @property
    def token_runs(self) -> list[tuple[int, int]]:
        """``[start, stop)`` token ranges that no token shares with another run: one per
        non-empty layer for ``granularity="layer"``, the whole sequence for ``"model"``
        (whose tokens mix layers). Windows (:class:`d2nwg.windows.WindowLayout`) cut these."""
        if self.granularity == "model":
            return [(0, self.num_tokens)]
        C = self.chunk_size
        return [(o // C, (o + s) // C) for o, s in zip(self._offsets, self._spans) if s]

    def token_range(self, layers: Iterable[int]) -> tuple[int, int]:
        """The ``[start, stop)`` tokens that hold the elements of the given layer indices."""
        C = self.chunk_size
        ends = [(self._offsets[s], self._offsets[s] + self._numel[s]) for s in layers]
        return min(a for a, _ in ends) // C, -(-max(b for _, b in ends) // C)

    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layers]

    @property
    def num_params(self) -> int:
        """Weights per model (tied tensors counted once)."""
        return sum(self._numel)

    def __repr__(self) -> str:
        return (
            f"WeightTokenizer({len(self.layers)} tensors, {self.num_params} weights -> "
            f"T={self.num_tokens} x C={self.chunk_size}, granularity={self.granularity!r}, "
            f"normalize={self.normalize!r})"
        )

    # ------------------------------------------------------------------ input checks
    def _sources(self, state_dict: StateDict, which: int) -> list[torch.Tensor]:
        """The tensors of one state dict in layout order, after checking keys/shapes/dtypes."""
        where = f"state dict {which}"
        if not isinstance(state_dict, Mapping):
            raise DTypeError(f"{where} is a {type(state_dict).__name__}, not a mapping")
        missing = [s.name for s in self.layers if s.name not in state_dict]
        known = self._index.keys() | self._aliases.keys() | self.ignored
        extra = [k for k in state_dict if k not in known]
        if missing or extra:
            raise KeyMismatchError(
                f"{where} does not match the layout: missing keys {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected keys "
                f"{extra[:8]}{' ...' if len(extra) > 8 else ''}"
            )
        out = []
        for spec in self.layers:
            t = state_dict[spec.name]
            if not isinstance(t, torch.Tensor):
                raise DTypeError(f"{where}[{spec.name!r}] is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != spec.shape:
                raise ShapeError(
                    f"{where}[{spec.name!r}] has shape {tuple(t.shape)}, the layout "
                    f"expects {spec.shape}"
                )
            if t.dtype != spec.torch_dtype:
                raise DTypeError(
                    f"{where}[{spec.name!r}] has dtype {t.dtype}, the layout "
                    f"expects {spec.torch_dtype}"
                )
            check_data_tensor(
                t, f"{where}[{spec.name!r}]",
                "it holds no weights to tokenize; a meta template only fixes the layout",
            )  # fmt: skip
            # Ties are a property of the template; each model must hold them too, or its
            # tied copy would silently be replaced by the tensor it is tied to.
            for alias in spec.aliases:
                if alias in state_dict and not (
                    isinstance(state_dict[alias], torch.Tensor) and _same_bits(t, state_dict[alias])
                ):
                    raise KeyMismatchError(
                        f"{where}[{alias!r}] differs from {where}[{spec.name!r}], but the two "
                        f"are tied in the template (one tensor), so the layout stores only "
                        f"{spec.name!r}; to tokenize both, build the layout from a template "
                        f"where they are separate tensors (e.g. a .clone() of one)"
                    )
            out.append(t)
        return out

    def _check_finite(self, state_dicts: Sequence[StateDict], tokens: torch.Tensor) -> None:
        """One cheap reduction over the tokens; only on failure find the layer to blame."""
        if self.allow_nonfinite:
            return
        # A sum is NaN/Inf if any element is (and ~20x faster than isfinite().all() on CPU);
        # if the sum merely overflowed, the exact check below clears it.
        total = tokens.sum(dtype=torch.float64 if tokens.dtype == torch.float64 else torch.float32)
        if math.isfinite(float(total)) or bool(torch.isfinite(tokens).all()):
            return
        for n, sd in enumerate(state_dicts):
            for spec in self.layers:
                if not bool(torch.isfinite(sd[spec.name]).all()):
                    raise NonFiniteError(
                        f"state dict {n}[{spec.name!r}] holds NaN or Inf "
                        f"(pass allow_nonfinite=True to tokenize it anyway)"
                    )
        raise NonFiniteError(
            f"normalized weights overflow the token dtype {tokens.dtype}; use a wider dtype"
        )

    # ------------------------------------------------------------------ statistics
    def fit(self, state_dicts: Iterable[StateDict]) -> WeightTokenizer:
        """Per-layer mean and std over a zoo, in float64, one state dict at a time.

        ``state_dicts`` may be any iterable (a generator that loads files lazily), so the zoo
        need not fit in memory. Merges per-tensor moments with Chan et al.'s parallel rule.
        """
        if isinstance(state_dicts, Mapping):  # one state dict, as tokenize() takes it
            state_dicts = [state_dicts]
        elif isinstance(state_dicts, (str, bytes, torch.Tensor)) or not isinstance(
            state_dicts, Iterable
        ):
            raise DTypeError(
                f"fit() takes an iterable of state dicts, got {type(state_dicts).__name__}"
            )
        if self.normalize is None:
            return self
        S = len(self.layers)
        count = torch.zeros(S, dtype=torch.float64)
        mean = torch.zeros(S, dtype=torch.float64)
        m2 = torch.zeros(S, dtype=torch.float64)
        seen = 0
        for n, sd in enumerate(state_dicts):
            for s, t in enumerate(self._sources(sd, n)):
                if t.numel() == 0:
                    continue
                var_b, mean_b = torch.var_mean(t.detach().double(), correction=0)
                mean_b, m2_b, n_b = float(mean_b), float(var_b) * t.numel(), float(t.numel())
                if not (math.isfinite(mean_b) and math.isfinite(m2_b)) and not self.allow_nonfinite:
                    raise NonFiniteError(
                        f"state dict {n}[{self.layers[s].name!r}] holds NaN or "
                        f"Inf (pass allow_nonfinite=True to allow it)"
                    )
                n_a = float(count[s])
                delta = mean_b - float(mean[s])
                total = n_a + n_b
                mean[s] += delta * n_b / total
                m2[s] += m2_b + delta * delta * n_a * n_b / total
                count[s] = total
            seen += 1
        if seen == 0:
            raise ConfigError("fit() needs at least one state dict")
        std = torch.sqrt(m2 / count.clamp(min=1))
        # Constant layers (e.g. LayerNorm weights that are all ones) are only shifted.
        std = torch.where((std > 0) & torch.isfinite(std), std, torch.ones_like(std))
        self.mean = torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))
        self.std = std
        return self

    # ------------------------------------------------------------------ tokens
    def tokenize(
        self,
        state_dicts: StateDict | Sequence[StateDict],
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Tokens ``[N, T, C]`` of N state dicts (one mapping gives N = 1), padding zero."""
        if isinstance(state_dicts, Mapping):
            state_dicts = [state_dicts]
        elif isinstance(state_dicts, (str, bytes, torch.Tensor)) or not isinstance(
            state_dicts, Iterable
        ):
            raise DTypeError(
                f"tokenize() takes a state dict or a sequence of them, got "
                f"{type(state_dicts).__name__}"
            )
        elif not isinstance(state_dicts, Sequence):
            state_dicts = list(state_dicts)
        if len(state_dicts) == 0:
            raise ConfigError("tokenize() needs at least one state dict")
        sources = [t.detach() for n, sd in enumerate(state_dicts) for t in self._sources(sd, n)]
        devices = {t.device for t in sources}
        if len(devices) > 1:
            raise DeviceError(
                f"state dict tensors are on several devices: {sorted(map(str, devices))}"
            )
        tokens = ops.tokenize(
            sources, self.plan, num_models=len(state_dicts), dtype=dtype, backend=backend
        )
        self._check_finite(state_dicts, tokens)
        return tokens

    def _check_tokens(self, tokens: torch.Tensor, rank: int) -> None:
        expected = ("[N, " if rank == 3 else "[") + f"{self.num_tokens}, {self.chunk_size}]"
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.dim() != rank
            or tuple(tokens.shape[-2:]) != (self.num_tokens, self.chunk_size)
        ):
            raise ShapeError(f"tokens have shape {shape_of(tokens)}, expected {expected}")
        if tokens.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"tokens have dtype {tokens.dtype}; expected one of {FLOAT_DTYPES}")

    def detokenize(
        self, tokens: torch.Tensor, backend: str | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """State dicts (original names, shapes, dtypes; on the tokens' device) from ``[N, T, C]``.

        Tied names share one tensor, as in the template.
        """
        self._check_tokens(tokens, 3)
        N = tokens.shape[0]
        dests = [
            torch.empty(spec.shape, dtype=spec.torch_dtype, device=tokens.device)
            for _ in range(N)
            for spec in self.layers
        ]
        ops.detokenize(tokens, dests, self.plan, backend=backend)
        S = len(self.layers)
        out = []
        for n in range(N):
            sd: dict[str, torch.Tensor] = {}
            for spec, t in zip(self.layers, dests[n * S : (n + 1) * S]):
                sd[spec.name] = t
                sd.update(dict.fromkeys(spec.aliases, t))
            out.append(sd)
        return out

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
        self._check_tokens(tokens, 2)
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
        if isinstance(target, torch.nn.Module):
            named = dict(target.named_parameters(remove_duplicate=False))
            named.update(target.named_buffers(remove_duplicate=False))
        elif isinstance(target, Mapping):
            named = target
        else:
            raise DTypeError(
                f"detokenize_into() writes into an nn.Module or a state dict, "
                f"got {type(target).__name__}"
            )
        missing = [s.name for s in self.layers if s.name not in named]
        if missing and not partial:
            raise KeyMismatchError(f"target lacks keys of the layout: {missing[:8]}")
        dests = {}
        for spec in self.layers:
            for name in (spec.name, *spec.aliases):
                if name in named:
                    dests[name] = self._check_destination(named, name, spec)
        devices = {d.device for d in dests.values()}
        if len(devices) > 1:
            raise DeviceError(f"target tensors are on several devices: {sorted(map(str, devices))}")
        _check_no_shared_memory([(s.name, dests[s.name]) for s in self.layers if s.name in dests])
        return dests

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
        device = next(iter(dests.values())).device
        row0, row1 = start * C, (start + n) * C
        shift, scale = normalization(self.mean, self.std)
        # Segments of a ChunkPlan over the range's row: one per layer part it holds, each
        # spanning up to the next; a leading empty segment if the row starts in padding.
        numel, offset, shifts, scales, parts = [], [], [], [], []
        for s, spec in enumerate(self.layers):
            lo = max(self._offsets[s], row0)
            hi = min(self._offsets[s] + self._numel[s], row1)
            if spec.name not in dests or lo >= hi:
                continue
            if not offset and lo > row0:
                numel.append(0), offset.append(0), shifts.append(0.0), scales.append(1.0)
                parts.append(torch.empty(0, device=device))
            numel.append(hi - lo), offset.append(lo - row0)
            shifts.append(float(shift[s])), scales.append(float(scale[s]))
            parts.append(_part(dests[spec.name], spec.name, lo - self._offsets[s], hi - lo))
        if not parts:
            return
        span = [b - a for a, b in zip(offset, offset[1:] + [row1 - row0])]
        plan = ChunkPlan(tuple(numel), tuple(offset), tuple(span), tuple(shifts), tuple(scales),
                         n, C)  # fmt: skip
        out = [torch.empty_like(p) for p in parts] if accumulate else parts
        with torch.no_grad():
            ops.detokenize(tokens.to(device)[None], out, plan, backend=backend)
            if accumulate:
                for p, value in zip(parts, out):
                    p.add_(value)

    def copy_aliases(self, dests: Mapping[str, torch.Tensor]) -> None:
        """Untied copies in a target get the values of the tensor they are tied to."""
        with torch.no_grad():
            for spec in self.layers:
                for alias in spec.aliases:
                    if alias in dests and spec.name in dests:
                        if storage_key(dests[alias]) != storage_key(dests[spec.name]):
                            dests[alias].copy_(dests[spec.name])

    @staticmethod
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

    # ------------------------------------------------------------------ files
    def _layout(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "chunk_size": self.chunk_size,
            "granularity": self.granularity,
            "normalize": self.normalize,
            "allow_nonfinite": self.allow_nonfinite,
            "ignored": sorted(self.ignored),
            "layers": [asdict(spec) for spec in self.layers],
        }

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: statistics as tensors, the layout as JSON metadata.

        Written to a temporary file and renamed, so no half-written file is ever left.
        """
        save_safetensors(
            {"mean": self.mean.contiguous(), "std": self.std.contiguous()},
            path,
            {"d2nwg": json.dumps(self._layout())},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeightTokenizer:
        """Load a file written by :meth:`save`; a bad file raises :class:`FileFormatError`
        naming the file and the field. Sizes are checked against the MAX_* limits of this
        module before anything is allocated; nothing is unpickled."""
        path = os.fspath(path)
        meta, tensors = read_safetensors(path)
        layout = parse_json_metadata(meta, "d2nwg", path, "tokenizer layout")
        if not isinstance(layout, dict):
            raise FileFormatError(
                f"{path}: the tokenizer layout is a {type(layout).__name__}, not a JSON object"
            )
        if layout.get("format") != FORMAT:
            raise FileFormatError(f"{path}: format {layout.get('format')!r} is not {FORMAT!r}")
        version = layout.get("version")
        if not _is_int(version) or version < 1:
            raise FileFormatError(f"{path}: field 'version' must be an int >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise FileFormatError(
                f"{path}: format version {version} is newer than this d2nwg "
                f"reads ({FORMAT_VERSION}); upgrade d2nwg"
            )
        known = {
            "format",
            "version",
            "chunk_size",
            "granularity",
            "normalize",
            "allow_nonfinite",
            "ignored",
            "layers",
        }
        unknown = sorted(set(layout) - known)
        if unknown:
            raise FileFormatError(f"{path}: unknown fields {unknown} in the tokenizer layout")
        if sorted(tensors) != ["mean", "std"]:
            raise FileFormatError(
                f"{path}: expected the tensors ['mean', 'std'], got {sorted(tensors)}"
            )

        def field(d: dict, key: str, types, where: str = "layout"):
            if key not in d:
                raise FileFormatError(f"{path}: {where} lacks the field {key!r}")
            value = d[key]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise FileFormatError(
                    f"{path}: {where} field {key!r} must be "
                    f"{' or '.join(t.__name__ for t in types)}, got {value!r:.80}"
                )
            return value

        layers_json = field(layout, "layers", (list,))
        if len(layers_json) > MAX_LAYERS:
            raise FileFormatError(f"{path}: {len(layers_json)} layers, more than {MAX_LAYERS}")
        layers = []
        for i, d in enumerate(layers_json):
            where = f"layers[{i}]"
            if not isinstance(d, dict):
                raise FileFormatError(f"{path}: {where} is a {type(d).__name__}, not an object")
            extra = sorted(set(d) - {"name", "shape", "dtype", "aliases", "kind"})
            if extra:
                raise FileFormatError(f"{path}: {where} has unknown fields {extra}")
            shape = field(d, "shape", (list,), where)
            if len(shape) > MAX_RANK or not all(_is_int(n) for n in shape):
                raise FileFormatError(
                    f"{path}: {where} field 'shape' must be a list of at most "
                    f"{MAX_RANK} ints, got {shape!r:.80}"
                )
            aliases = field(d, "aliases", (list,), where)
            if not all(isinstance(a, str) for a in aliases):
                raise FileFormatError(f"{path}: {where} field 'aliases' must hold strings")
            layers.append(
                LayerSpec(
                    field(d, "name", (str,), where),
                    tuple(shape),
                    field(d, "dtype", (str,), where),
                    tuple(aliases),
                    field(d, "kind", (str,), where),
                )
            )
        ignored = field(layout, "ignored", (list,))
        if not all(isinstance(a, str) for a in ignored):
            raise FileFormatError(f"{path}: field 'ignored' must hold strings")
        chunk_size = field(layout, "chunk_size", (int,))
        granularity = field(layout, "granularity", (str,))
        if "normalize" not in layout:
            raise FileFormatError(f"{path}: layout lacks the field 'normalize'")
        normalize = layout["normalize"]
        if normalize is not None and not isinstance(normalize, str):
            raise FileFormatError(
                f"{path}: field 'normalize' must be a string or null, got {normalize!r:.80}"
            )
        allow_nonfinite = layout.get("allow_nonfinite", False)
        if not isinstance(allow_nonfinite, bool):
            raise FileFormatError(
                f"{path}: field 'allow_nonfinite' must be a bool, got {allow_nonfinite!r:.80}"
            )
        for key in ("mean", "std"):
            if tensors[key].dtype != torch.float64:
                raise FileFormatError(
                    f"{path}: tensor {key!r} has dtype {tensors[key].dtype}, expected float64"
                )
        try:
            return cls(
                layers,
                chunk_size,
                granularity,
                normalize,
                ignored,
                tensors["mean"],
                tensors["std"],
                allow_nonfinite,
            )
        except D2NWGError as exc:  # ConfigError, ShapeError, ...: what is wrong, with the file
            raise FileFormatError(f"{path}: invalid tokenizer layout: {exc}") from exc
