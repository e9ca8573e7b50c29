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
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import torch

from d2nwg import ops
from d2nwg.errors import (
    ConfigError,
    DeviceError,
    DTypeError,
    FileFormatError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
    shape_of,
)
from d2nwg.files import read_safetensors, save_safetensors
from d2nwg.ops.tokenize import FLOAT_DTYPES, ChunkPlan

FORMAT = "d2nwg.WeightTokenizer"
FORMAT_VERSION = 1
# BatchNorm running statistics are state, not learned weights.
DEFAULT_EXCLUDE = ("*running_mean", "*running_var", "*num_batches_tracked")
StateDict = Mapping[str, torch.Tensor]
CENTER_THRESHOLD = 0.5  # center a layer when |mean| >= this * std


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


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


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

    def __init__(self, layers: Sequence[LayerSpec], chunk_size: int, granularity: str = "layer",
                 normalize: str | None = "layer", ignored: Iterable[str] = (),
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                 allow_nonfinite: bool = False) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if granularity not in ("layer", "model"):
            raise ConfigError(f"granularity must be 'layer' or 'model', got {granularity!r}")
        if normalize not in ("layer", None):
            raise ConfigError(f"normalize must be 'layer' or None, got {normalize!r}")
        if not layers:
            raise ConfigError("no tensor selected for tokenization (check include/exclude)")
        self.layers = tuple(layers)
        self.chunk_size = chunk_size
        self.granularity = granularity
        self.normalize = normalize
        self.ignored = frozenset(ignored)
        self.allow_nonfinite = allow_nonfinite
        S = len(self.layers)
        self.mean = torch.zeros(S, dtype=torch.float64) if mean is None else mean.double()
        self.std = torch.ones(S, dtype=torch.float64) if std is None else std.double()
        if self.mean.shape != (S,) or self.std.shape != (S,):
            raise ShapeError(f"mean/std must have shape [{S}], got {tuple(self.mean.shape)} "
                             f"and {tuple(self.std.shape)}")
        self._index = {spec.name: i for i, spec in enumerate(self.layers)}
        self._aliases = {a: spec.name for spec in self.layers for a in spec.aliases}
        self._place()

    # ------------------------------------------------------------------ layout
    @classmethod
    def from_state_dict(cls, state_dict: StateDict, chunk_size: int = 256,
                        granularity: str = "layer", normalize: str | None = "layer",
                        include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                        allow_nonfinite: bool = False) -> "WeightTokenizer":
        """Fix the layout from a template state dict (its order is the token order)."""
        exclude = DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
        layers: list[LayerSpec] = []
        ignored: list[str] = []
        tied: dict[tuple, int] = {}
        for name, t in state_dict.items():
            if not isinstance(t, torch.Tensor):
                raise DTypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
            selected = (include is None or any(fnmatch.fnmatchcase(name, p) for p in include)) \
                and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
            if not selected:
                ignored.append(name)
                continue
            if t.dtype not in FLOAT_DTYPES:
                if include is not None:  # asked for by name: say why it cannot be
                    raise DTypeError(f"state_dict[{name!r}] has dtype {t.dtype}; only floating "
                                     f"tensors {FLOAT_DTYPES} can be tokenized")
                ignored.append(name)
                continue
            key = _storage_key(t)
            if key in tied and t.numel() > 0:
                first = layers[tied[key]]
                layers[tied[key]] = LayerSpec(first.name, first.shape, first.dtype,
                                              first.aliases + (name,), first.kind)
                continue
            tied[key] = len(layers)
            shape = tuple(t.shape)
            layers.append(LayerSpec(name, shape, _dtype_name(t.dtype), (), _layer_kind(name, shape)))
        if not layers:
            raise ConfigError(f"no floating tensor of the {len(state_dict)} in the state dict "
                              f"is selected (include={include}, exclude={list(exclude)})")
        return cls(layers, chunk_size, granularity, normalize, ignored, allow_nonfinite=allow_nonfinite)

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
        flat_mask = torch.zeros(T * C, dtype=torch.bool)
        for off, n in zip(offsets, numel):
            flat_mask[off:off + n] = True
        # A token belongs to the layer its first element belongs to (empty layers own none).
        starts = torch.tensor(offsets, dtype=torch.long)
        token_start = torch.arange(T, dtype=torch.long) * C
        layer_of_token = torch.searchsorted(starts, token_start, right=True) - 1
        self.mask = flat_mask.view(T, C)
        if self.granularity == "layer":
            chunk_idx = (token_start - starts[layer_of_token]) // C
        else:
            chunk_idx = torch.arange(T, dtype=torch.long)
        self.positions = torch.stack([layer_of_token, chunk_idx], dim=1)
        self.kind_names = tuple(sorted({spec.kind for spec in self.layers}))
        kind_of_layer = torch.tensor([self.kind_names.index(s.kind) for s in self.layers])
        self.kinds = kind_of_layer[layer_of_token]

    @property
    def plan(self) -> ChunkPlan:
        shift, scale = normalization(self.mean, self.std)
        return ChunkPlan(self._numel, self._offsets, self._spans, tuple(shift.tolist()),
                         tuple(scale.tolist()), self.num_tokens, self.chunk_size)

    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layers]

    @property
    def num_params(self) -> int:
        """Weights per model (tied tensors counted once)."""
        return sum(self._numel)

    def __repr__(self) -> str:
        return (f"WeightTokenizer({len(self.layers)} tensors, {self.num_params} weights -> "
                f"T={self.num_tokens} x C={self.chunk_size}, granularity={self.granularity!r}, "
                f"normalize={self.normalize!r})")

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
            raise KeyMismatchError(f"{where} does not match the layout: missing keys {missing[:8]}"
                                   f"{' ...' if len(missing) > 8 else ''}, unexpected keys "
                                   f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
        out = []
        for spec in self.layers:
            t = state_dict[spec.name]
            if not isinstance(t, torch.Tensor):
                raise DTypeError(f"{where}[{spec.name!r}] is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != spec.shape:
                raise ShapeError(f"{where}[{spec.name!r}] has shape {tuple(t.shape)}, the layout "
                                 f"expects {spec.shape}")
            if t.dtype != spec.torch_dtype:
                raise DTypeError(f"{where}[{spec.name!r}] has dtype {t.dtype}, the layout "
                                 f"expects {spec.torch_dtype}")
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
                    raise NonFiniteError(f"state dict {n}[{spec.name!r}] holds NaN or Inf "
                                         f"(pass allow_nonfinite=True to tokenize it anyway)")
        raise NonFiniteError(f"normalized weights overflow the token dtype {tokens.dtype}; "
                             f"use a wider dtype")

    # ------------------------------------------------------------------ statistics
    def fit(self, state_dicts: Iterable[StateDict]) -> "WeightTokenizer":
        """Per-layer mean and std over a zoo, in float64, one state dict at a time.

        ``state_dicts`` may be any iterable (a generator that loads files lazily), so the zoo
        need not fit in memory. Merges per-tensor moments with Chan et al.'s parallel rule.
        """
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
                    raise NonFiniteError(f"state dict {n}[{self.layers[s].name!r}] holds NaN or "
                                         f"Inf (pass allow_nonfinite=True to allow it)")
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
    def tokenize(self, state_dicts: StateDict | Sequence[StateDict],
                 dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
        """Tokens ``[N, T, C]`` of N state dicts (one mapping gives N = 1), padding zero."""
        if isinstance(state_dicts, Mapping):
            state_dicts = [state_dicts]
        if len(state_dicts) == 0:
            raise ConfigError("tokenize() needs at least one state dict")
        sources = [t.detach() for n, sd in enumerate(state_dicts) for t in self._sources(sd, n)]
        devices = {t.device for t in sources}
        if len(devices) > 1:
            raise DeviceError(f"state dict tensors are on several devices: {sorted(map(str, devices))}")
        tokens = ops.tokenize(sources, self.plan, num_models=len(state_dicts), dtype=dtype,
                              backend=backend)
        self._check_finite(state_dicts, tokens)
        return tokens

    def _check_tokens(self, tokens: torch.Tensor, rank: int) -> None:
        expected = ("[N, " if rank == 3 else "[") + f"{self.num_tokens}, {self.chunk_size}]"
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != rank \
                or tuple(tokens.shape[-2:]) != (self.num_tokens, self.chunk_size):
            raise ShapeError(f"tokens have shape {shape_of(tokens)}, expected {expected}")
        if tokens.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"tokens have dtype {tokens.dtype}; expected one of {FLOAT_DTYPES}")

    def detokenize(self, tokens: torch.Tensor, backend: str | None = None) -> list[dict[str, torch.Tensor]]:
        """State dicts (original names, shapes, dtypes; on the tokens' device) from ``[N, T, C]``.

        Tied names share one tensor, as in the template.
        """
        self._check_tokens(tokens, 3)
        N = tokens.shape[0]
        dests = [torch.empty(spec.shape, dtype=spec.torch_dtype, device=tokens.device)
                 for _ in range(N) for spec in self.layers]
        ops.detokenize(tokens, dests, self.plan, backend=backend)
        S = len(self.layers)
        out = []
        for n in range(N):
            sd: dict[str, torch.Tensor] = {}
            for spec, t in zip(self.layers, dests[n * S:(n + 1) * S]):
                sd[spec.name] = t
                sd.update(dict.fromkeys(spec.aliases, t))
            out.append(sd)
        return out

    def detokenize_into(self, target: torch.nn.Module | dict[str, torch.Tensor],
                        tokens: torch.Tensor, backend: str | None = None):
        """Write one model's tokens ``[T, C]`` in place into a module or a state dict.

        No full-size intermediate: the kernel scatters straight into the parameter tensors
        (cast to each destination's dtype). Returns ``target``.
        """
        self._check_tokens(tokens, 2)
        if isinstance(target, torch.nn.Module):
            named = dict(target.named_parameters(remove_duplicate=False))
            named.update(target.named_buffers(remove_duplicate=False))
        elif isinstance(target, Mapping):
            named = target
        else:
            raise DTypeError(f"detokenize_into() writes into an nn.Module or a state dict, "
                             f"got {type(target).__name__}")
        missing = [s.name for s in self.layers if s.name not in named]
        if missing:
            raise KeyMismatchError(f"target lacks keys of the layout: {missing[:8]}")
        dests = []
        for spec in self.layers:
            t = named[spec.name]
            if tuple(t.shape) != spec.shape:
                raise ShapeError(f"target[{spec.name!r}] has shape {tuple(t.shape)}, the layout "
                                 f"expects {spec.shape}")
            if t.dtype not in FLOAT_DTYPES:
                raise DTypeError(f"target[{spec.name!r}] has dtype {t.dtype}, not floating")
            dests.append(t.detach())
        devices = {d.device for d in dests}
        if len(devices) > 1:
            raise DeviceError(f"target tensors are on several devices: {sorted(map(str, devices))}")
        with torch.no_grad():
            ops.detokenize(tokens.to(dests[0].device)[None], dests, self.plan, backend=backend)
            for spec, d in zip(self.layers, dests):
                for alias in spec.aliases:  # untied copies in the target get the same values
                    if alias in named and named[alias].data_ptr() != d.data_ptr():
                        named[alias].detach().copy_(d)
        return target

    # ------------------------------------------------------------------ files
    def _layout(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "chunk_size": self.chunk_size,
                "granularity": self.granularity, "normalize": self.normalize,
                "allow_nonfinite": self.allow_nonfinite, "ignored": sorted(self.ignored),
                "layers": [asdict(spec) for spec in self.layers]}

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: statistics as tensors, the layout as JSON metadata.

        Written to a temporary file and renamed, so no half-written file is ever left.
        """
        save_safetensors({"mean": self.mean.contiguous(), "std": self.std.contiguous()}, path,
                         {"d2nwg": json.dumps(self._layout())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WeightTokenizer":
        """Load a file written by :meth:`save`; a bad file raises :class:`FileFormatError`."""
        path = os.fspath(path)
        meta, tensors = read_safetensors(path)
        try:
            layout = json.loads(meta["d2nwg"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise FileFormatError(f"{path}: no d2nwg tokenizer layout in the metadata") from exc
        if layout.get("format") != FORMAT:
            raise FileFormatError(f"{path}: format {layout.get('format')!r} is not {FORMAT!r}")
        version = layout.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FileFormatError(f"{path}: format version {version} is newer than this d2nwg "
                                  f"reads ({FORMAT_VERSION}); upgrade d2nwg")
        try:
            layers = [LayerSpec(d["name"], tuple(d["shape"]), d["dtype"], tuple(d["aliases"]),
                                d["kind"]) for d in layout["layers"]]
            for spec in layers:
                if not isinstance(getattr(torch, spec.dtype, None), torch.dtype):
                    raise ValueError(f"unknown dtype {spec.dtype!r} of {spec.name!r}")
            return cls(layers, layout["chunk_size"], layout["granularity"], layout["normalize"],
                       layout["ignored"], tensors["mean"], tensors["std"],
                       layout.get("allow_nonfinite", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{path}: malformed tokenizer layout: {exc}") from exc
