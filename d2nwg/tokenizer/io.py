"""The tokenizer file: one safetensors file, statistics as tensors, the layout as JSON.

Tensors ``mean`` and ``std`` (float64, one entry per layer); metadata ``d2nwg``: the layout
(format, version, chunk size, granularity, normalization, ignored names, layers, and the
layers whose rows each start a token when there are any: ``row_tokens``). Reading
checks every field by type, and sizes against :mod:`d2nwg.tokenizer.limits` before anything
is allocated; a bad file raises :class:`FileFormatError` naming the file and the field.
Nothing is unpickled. What the fields must mean together (e.g. distinct names) is left to
the tokenizer's constructor, whose errors the loader reports with the path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import torch

from d2nwg.errors import FileFormatError
from d2nwg.files import parse_json_metadata, read_safetensors, save_safetensors
from d2nwg.tokenizer import limits
from d2nwg.tokenizer.layers import LayerSpec, is_int

FORMAT = "d2nwg.WeightTokenizer"
FORMAT_VERSION = 1
FIELDS = frozenset(
    ("format", "version", "chunk_size", "granularity", "normalize", "allow_nonfinite")
    + ("ignored", "layers", "row_tokens")
)
LAYER_FIELDS = frozenset(("name", "shape", "dtype", "aliases", "kind"))


def layout_json(
    layers: Sequence[LayerSpec],
    chunk_size: int,
    granularity: str,
    normalize: str | None,
    allow_nonfinite: bool,
    ignored: Iterable[str],
    row_tokens: Sequence[str] = (),
) -> dict:
    """The layout as the file's JSON object (``row_tokens`` only when there are any, so a
    layout without them reads as it did)."""
    layout = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "chunk_size": chunk_size,
        "granularity": granularity,
        "normalize": normalize,
        "allow_nonfinite": allow_nonfinite,
        "ignored": sorted(ignored),
        "layers": [asdict(spec) for spec in layers],
    }
    if row_tokens:
        layout["row_tokens"] = list(row_tokens)
    return layout


def save(path: str | os.PathLike, layout: dict, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Written to a temporary file and renamed, so no half-written file is ever left."""
    save_safetensors(
        {"mean": mean.contiguous(), "std": std.contiguous()}, path, {"d2nwg": json.dumps(layout)}
    )


def read(path: str | os.PathLike) -> dict:
    """The constructor arguments of :class:`WeightTokenizer` that the file at ``path`` holds,
    each checked by type: layers, chunk_size, granularity, normalize, ignored, mean, std,
    allow_nonfinite and row_tokens."""
    path = os.fspath(path)
    layout, tensors = _read_header(path)
    f = _Fields(path)
    args = {"layers": _layers(f, layout)}
    args.update(_options(f, layout))
    args.update(_statistics(path, tensors))
    return args


def _read_header(path: str) -> tuple[dict, dict]:
    """The layout object and the tensors, once the format, version, the set of fields and
    the tensors' names are the ones this version writes."""
    meta, tensors = read_safetensors(path)
    layout = parse_json_metadata(meta, "d2nwg", path, "tokenizer layout")
    if not isinstance(layout, dict):
        raise FileFormatError(
            f"{path}: the tokenizer layout is a {type(layout).__name__}, not a JSON object"
        )
    if layout.get("format") != FORMAT:
        raise FileFormatError(f"{path}: format {layout.get('format')!r} is not {FORMAT!r}")
    version = layout.get("version")
    if not is_int(version) or version < 1:
        raise FileFormatError(f"{path}: field 'version' must be an int >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: format version {version} is newer than this d2nwg "
            f"reads ({FORMAT_VERSION}); upgrade d2nwg"
        )
    unknown = sorted(set(layout) - FIELDS)
    if unknown:
        raise FileFormatError(f"{path}: unknown fields {unknown} in the tokenizer layout")
    if sorted(tensors) != ["mean", "std"]:
        raise FileFormatError(
            f"{path}: expected the tensors ['mean', 'std'], got {sorted(tensors)}"
        )
    return layout, tensors


class _Fields:
    """Typed access to a JSON object's fields; errors name the file and the field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, d: dict, key: str, types: tuple, where: str = "layout"):
        if key not in d:
            raise FileFormatError(f"{self.path}: {where} lacks the field {key!r}")
        value = d[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise FileFormatError(
                f"{self.path}: {where} field {key!r} must be "
                f"{' or '.join(t.__name__ for t in types)}, got {value!r:.80}"
            )
        return value

    def strings(self, d: dict, key: str, where: str = "layout") -> list:
        values = self(d, key, (list,), where)
        if not all(isinstance(a, str) for a in values):
            where = "" if where == "layout" else f"{where} "
            raise FileFormatError(f"{self.path}: {where}field {key!r} must hold strings")
        return values


def _layers(field: _Fields, layout: dict) -> list[LayerSpec]:
    layers_json = field(layout, "layers", (list,))
    if len(layers_json) > limits.MAX_LAYERS:
        raise FileFormatError(
            f"{field.path}: {len(layers_json)} layers, more than {limits.MAX_LAYERS}"
        )
    return [_layer(field, i, d) for i, d in enumerate(layers_json)]


def _layer(field: _Fields, i: int, d) -> LayerSpec:
    path, where = field.path, f"layers[{i}]"
    if not isinstance(d, dict):
        raise FileFormatError(f"{path}: {where} is a {type(d).__name__}, not an object")
    extra = sorted(set(d) - LAYER_FIELDS)
    if extra:
        raise FileFormatError(f"{path}: {where} has unknown fields {extra}")
    shape = field(d, "shape", (list,), where)
    if len(shape) > limits.MAX_RANK or not all(is_int(n) for n in shape):
        raise FileFormatError(
            f"{path}: {where} field 'shape' must be a list of at most "
            f"{limits.MAX_RANK} ints, got {shape!r:.80}"
        )
    aliases = field.strings(d, "aliases", where)
    name, dtype = field(d, "name", (str,), where), field(d, "dtype", (str,), where)
    return LayerSpec(name, tuple(shape), dtype, tuple(aliases), field(d, "kind", (str,), where))


def _options(field: _Fields, layout: dict) -> dict:
    path = field.path
    ignored = field.strings(layout, "ignored")
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
    row_tokens = field.strings(layout, "row_tokens") if "row_tokens" in layout else []
    return {
        "chunk_size": chunk_size,
        "granularity": granularity,
        "normalize": normalize,
        "ignored": ignored,
        "allow_nonfinite": allow_nonfinite,
        "row_tokens": row_tokens,
    }


def _statistics(path: str, tensors: dict) -> dict:
    for key in ("mean", "std"):
        if tensors[key].dtype != torch.float64:
            raise FileFormatError(
                f"{path}: tensor {key!r} has dtype {tensors[key].dtype}, expected float64"
            )
    return {"mean": tensors["mean"], "std": tensors["std"]}
