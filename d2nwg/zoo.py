"""ModelZoo: the trained models a generator learns from, each with its condition and metadata.

A zoo is an ordered list of items ``(state_dict, condition, meta)`` that all share one
architecture (same tensor names, shapes and dtypes). On disk it is a directory::

    zoo.json                          format, layout, condition spec, one record per item
    model_00000.safetensors           one file per model (tied tensors stored once)
    condition_00000.safetensors       one file per condition (key "condition"), if any

:meth:`ModelZoo.from_directory` reads ``zoo.json`` only; each item is read and checked when it
is accessed, and not kept, so iterating over a zoo larger than memory is fine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import NamedTuple, overload

import torch

from d2nwg.errors import (
    ConfigError,
    D2NWGError,
    DTypeError,
    FileFormatError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
)
from d2nwg.files import all_finite as _all_finite
from d2nwg.files import read_json, read_safetensors, save_json, save_safetensors
from d2nwg.tensors import StateDict, storage_key

FORMAT = "d2nwg.ModelZoo"
FORMAT_VERSION = 1
MANIFEST = "zoo.json"

# What safetensors can store; anything else would only fail at save time.
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


class ZooItem(NamedTuple):
    """One model of a zoo.

    state_dict: names -> tensors, in the zoo's layout order (tied names share one tensor).
    condition: ``[classes, shots, F]`` dataset examples, ``[L, E]`` text embedding, or None.
    meta: JSON-compatible dict (task name, accuracy, ...).
    """

    state_dict: StateDict
    condition: torch.Tensor | None
    meta: dict


@dataclass(frozen=True)
class _Spec:
    """What every item must match, fixed by the first item."""

    layout: Layout
    condition: tuple[int, int] | None  # (rank, trailing feature width), None: no conditions


@dataclass(frozen=True)
class _OnDisk:
    """An item of a zoo read from a directory: absolute file paths, read on access."""

    weights: str
    condition: str | None
    meta: dict
    aliases: dict[str, str]  # tied name -> the stored name it shares storage with


def _check_state_dict(sd: Mapping[str, torch.Tensor], layout: Layout | None) -> None:
    """Raise a D2NWGError naming the first key that is not a finite tensor matching ``layout``."""
    if layout is not None and set(sd) != set(layout):
        missing = [k for k in layout if k not in sd]
        unexpected = [k for k in sd if k not in layout]
        raise KeyMismatchError(
            f"state dict does not match the zoo's layout: missing keys "
            f"{missing}, unexpected keys {unexpected}"
        )
    for name, t in sd.items():
        if not isinstance(name, str):
            raise ConfigError(f"state dict key {name!r} is a {type(name).__name__}, not a str")
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_meta:
            raise ConfigError(
                f"state_dict[{name!r}] is a {t.layout} tensor on {t.device}; "
                f"only dense tensors with data can be stored"
            )
        if t.dtype not in _DTYPES.values():
            raise DTypeError(
                f"state_dict[{name!r}] has dtype {t.dtype}; a zoo stores {sorted(_DTYPES)}"
            )
        if layout is not None:
            shape, dtype = layout[name]
            if tuple(t.shape) != shape:
                raise ShapeError(
                    f"state_dict[{name!r}] has shape {tuple(t.shape)}; the zoo's layout has {shape}"
                )
            if t.dtype != dtype:
                raise DTypeError(
                    f"state_dict[{name!r}] has dtype {t.dtype}; the zoo's layout has {dtype}"
                )
        if not _all_finite(t):
            raise NonFiniteError(f"state_dict[{name!r}] holds NaN or Inf")


def _check_condition(c: object, spec: tuple[int, int] | None) -> None:
    """Raise a D2NWGError unless ``c`` is a finite floating rank-2/3 tensor matching ``spec``."""
    if not isinstance(c, torch.Tensor):
        raise DTypeError(f"condition is a {type(c).__name__}, not a tensor")
    if not c.is_floating_point():
        raise DTypeError(f"condition has dtype {c.dtype}; expected a floating dtype")
    if c.dim() not in (2, 3):
        raise ShapeError(
            f"condition has shape {tuple(c.shape)}; expected [classes, shots, F] "
            f"dataset examples or an [L, E] text embedding"
        )
    if spec is not None and (c.dim(), c.shape[-1]) != spec:
        raise ShapeError(
            f"condition has shape {tuple(c.shape)}; the zoo's conditions have rank "
            f"{spec[0]} and {spec[1]} features in the last dimension"
        )
    if not _all_finite(c):
        raise NonFiniteError("condition holds NaN or Inf")


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy that later in-place edits of ``t`` cannot reach."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())


def untie(sd: StateDict) -> tuple[StateDict, dict[str, str]]:
    """(tensors to store, {alias: stored name}): safetensors refuses tensors sharing storage."""
    stored: StateDict = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in sd.items():
        key = storage_key(t)
        if t.numel() > 0 and key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            stored[name] = t
    return stored, aliases


def _relative_path(value: object, where: str) -> str:
    """A path from zoo.json that stays inside the zoo's directory, else ValueError."""
    if not isinstance(value, str) or value in ("", "."):
        raise ValueError(f"{where} is {value!r}, not a file name")
    if (
        PurePosixPath(value).is_absolute()
        or PureWindowsPath(value).is_absolute()
        or PureWindowsPath(value).drive
        or ".." in PureWindowsPath(value).parts
    ):
        raise ValueError(f"{where} {value!r} leaves the zoo's directory")
    return value


def _parse_manifest(manifest: object, directory: str) -> tuple[_Spec | None, list[_OnDisk]]:
    """The spec and items of a zoo.json; ValueError / TypeError / KeyError on anything off."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"format is {found!r}, not {FORMAT!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise ValueError(f"format_version {version!r} is not a positive int")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"format_version {version} is newer than this d2nwg reads "
            f"({FORMAT_VERSION}); upgrade d2nwg"
        )
    layout: Layout = {}
    for name, entry in manifest["layout"].items():
        shape, dtype = entry["shape"], entry["dtype"]
        if not isinstance(shape, list) or any(type(n) is not int or n < 0 for n in shape):
            raise ValueError(f"layout[{name!r}] shape {shape!r} is not a list of ints >= 0")
        if dtype not in _DTYPES:
            raise ValueError(f"layout[{name!r}] has unknown dtype {dtype!r}")
        layout[name] = (tuple(shape), _DTYPES[dtype])
    cond = manifest["condition"]
    if cond is not None:
        rank, features = cond["rank"], cond["features"]
        if type(rank) is not int or rank not in (2, 3) or type(features) is not int or features < 0:
            raise ValueError(f"condition spec {cond!r} is not {{rank: 2 or 3, features: int}}")
        cond = (rank, features)
    items: list[_OnDisk] = []
    for i, record in enumerate(manifest["items"]):
        weights = _relative_path(record["weights"], f"items[{i}].weights")
        cpath = record["condition"]
        if (cpath is None) != (cond is None):
            raise ValueError(
                f"items[{i}].condition is {cpath!r} but the zoo's condition spec "
                f"is {manifest['condition']!r}"
            )
        if cpath is not None:
            cpath = os.path.join(directory, _relative_path(cpath, f"items[{i}].condition"))
        meta, aliases = record["meta"], record.get("aliases", {})
        if not isinstance(meta, dict) or not isinstance(aliases, dict):
            raise TypeError(f"items[{i}]: meta and aliases must be objects")
        for alias, target in aliases.items():
            if (
                alias not in layout
                or target not in layout
                or target in aliases
                or layout[alias] != layout[target]
            ):
                raise ValueError(
                    f"items[{i}].aliases: {alias!r} -> {target!r} does not tie two "
                    f"names of the same shape and dtype in the layout"
                )
        items.append(_OnDisk(os.path.join(directory, weights), cpath, meta, aliases))
    if items and not layout:
        raise ValueError("the layout is empty but the zoo has items")
    return (_Spec(layout, cond) if layout else None), items


class ModelZoo:
    """An ordered collection of models of one architecture, with conditions and metadata.

    ``zoo[i]`` is a :class:`ZooItem` (negative indices work); ``zoo[a:b:c]`` and
    :meth:`shard` are views: zoos holding the same items without copying their tensors (adding
    to a view does not add to the zoo it came from). Items of a zoo from :meth:`from_directory`
    are read from disk each time they are accessed.
    """

    def __init__(self) -> None:
        self._spec: _Spec | None = None
        self._items: list[ZooItem | _OnDisk] = []

    # ------------------------------------------------------------------ building
    def add(
        self,
        state_dict: Mapping[str, torch.Tensor],
        condition: torch.Tensor | None = None,
        meta: Mapping | None = None,
    ) -> None:
        """Append a model. Its tensors are copied (detached, CPU, contiguous; ties kept).

        state_dict: the first item fixes the zoo's names, shapes and dtypes; later ones must match.
        condition: ``[classes, shots, F]`` or ``[L, E]`` floating tensor, or None; either every
            item has one or none does, all of one rank and one last-dimension width.
        meta: a JSON-serializable dict, stored as a copy.
        """
        if not isinstance(state_dict, Mapping):
            raise ConfigError(
                f"state_dict must be a mapping of names to tensors, "
                f"got a {type(state_dict).__name__}"
            )
        if not state_dict:
            raise ConfigError("state_dict is empty")
        spec = self._spec
        _check_state_dict(state_dict, spec.layout if spec else None)
        if spec is not None and (condition is None) != (spec.condition is None):
            raise ConfigError(
                f"every item of a zoo has a condition or none does: this item has "
                f"{'none' if condition is None else 'one'}, the first "
                f"{'has one' if condition is None else 'has none'}"
            )
        if condition is not None:
            _check_condition(condition, spec.condition if spec else None)
        meta = {} if meta is None else meta
        if not isinstance(meta, Mapping):
            raise ConfigError(f"meta must be a dict, got {type(meta).__name__}")
        try:  # a JSON round trip: checks it can be saved, and copies it
            meta = json.loads(json.dumps(dict(meta), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"meta is not JSON-serializable: {exc}") from exc

        # Copy each distinct tensor once, so tied names stay tied in the zoo.
        order = spec.layout if spec else state_dict
        copies: dict[tuple, torch.Tensor] = {}
        sd: StateDict = {}
        for name in order:
            t = state_dict[name]
            key = storage_key(t)
            if key not in copies or t.numel() == 0:
                copies[key] = _cpu_copy(t)
            sd[name] = copies[key]
        cond = None if condition is None else _cpu_copy(condition)
        if spec is None:
            self._spec = _Spec(
                {k: (tuple(t.shape), t.dtype) for k, t in sd.items()},
                None if cond is None else (cond.dim(), cond.shape[-1]),
            )
        self._items.append(ZooItem(sd, cond, meta))

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> ZooItem: ...
    @overload
    def __getitem__(self, index: slice) -> ModelZoo: ...

    def __getitem__(self, index: int | slice) -> ZooItem | ModelZoo:
        if isinstance(index, slice):
            return self._view(self._items[index])
        return self._get(self._items[index])  # IndexError / TypeError as for a list

    def __iter__(self) -> Iterator[ZooItem]:
        for item in self._items:
            yield self._get(item)

    def state_dicts(self) -> Iterator[StateDict]:
        """The state dicts one at a time (conditions are not read), e.g. for tokenizer.fit."""
        for item in self._items:
            yield dict(item.state_dict) if isinstance(item, ZooItem) else self._load_weights(item)

    def _get(self, item: ZooItem | _OnDisk) -> ZooItem:
        # New containers, so that editing them cannot change the zoo; the tensors of items held
        # in memory are the zoo's own (not copied on every access): clone before in-place edits.
        if isinstance(item, ZooItem):
            return ZooItem(dict(item.state_dict), item.condition, copy.deepcopy(item.meta))
        return self._load(item)

    @property
    def layout(self) -> Layout:
        """``{name: (shape, dtype)}`` shared by every item (empty before the first add)."""
        return dict(self._spec.layout) if self._spec else {}

    def shard(self, rank: int | None = None, world_size: int | None = None) -> ModelZoo:
        """The view of items ``i`` with ``i % world_size == rank``, so that every process of a
        distributed job reads its own share. Defaults: torch.distributed's rank and world size
        when it is initialized, else (0, 1)."""
        if rank is None and world_size is None:
            dist = torch.distributed
            initialized = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
        if (
            type(world_size) is not int
            or world_size < 1
            or type(rank) is not int
            or not 0 <= rank < world_size
        ):
            raise ConfigError(
                f"shard(rank={rank!r}, world_size={world_size!r}): need ints with "
                f"0 <= rank < world_size"
            )
        return self._view(self._items[rank::world_size])

    def _view(self, items: list) -> ModelZoo:
        view = ModelZoo()
        view._spec, view._items = self._spec, items
        return view

    def __repr__(self) -> str:
        spec = self._spec
        cond = (
            "none"
            if spec is None or spec.condition is None
            else f"rank {spec.condition[0]}, {spec.condition[1]} features"
        )
        return (
            f"ModelZoo({len(self)} items, {len(spec.layout) if spec else 0} tensors each, "
            f"conditions: {cond})"
        )

    # ------------------------------------------------------------------ files
    def _load_weights(self, item: _OnDisk) -> StateDict:
        layout = self._spec.layout
        _, tensors = read_safetensors(item.weights)
        try:
            _check_state_dict(tensors, {k: v for k, v in layout.items() if k not in item.aliases})
        except D2NWGError as exc:
            raise FileFormatError(f"{item.weights}: {exc}") from exc
        return {name: tensors[item.aliases.get(name, name)] for name in layout}

    def _load(self, item: _OnDisk) -> ZooItem:
        sd = self._load_weights(item)
        cond = None
        if item.condition is not None:
            _, tensors = read_safetensors(item.condition)
            try:
                if set(tensors) != {"condition"}:
                    raise KeyMismatchError(f"holds keys {sorted(tensors)}; expected ['condition']")
                _check_condition(tensors["condition"], self._spec.condition)
            except D2NWGError as exc:
                raise FileFormatError(f"{item.condition}: {exc}") from exc
            cond = tensors["condition"]
        return ZooItem(sd, cond, copy.deepcopy(item.meta))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the zoo to ``directory`` (created if needed), replacing a zoo already there.

        Every file is first written to a temporary folder inside ``directory``; only when all
        are written are they renamed into place, ``zoo.json`` last. A failed save leaves the
        directory as it was. Items of a zoo read from ``directory`` itself are read before
        anything there is replaced, so ``from_directory(d)``, ``add``, ``save(d)`` appends
        (other zoo objects reading ``d``, e.g. the zoo a view was taken from, go stale).
        """
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        old = self._referenced_files(directory)
        staging = tempfile.mkdtemp(prefix=".tmp-zoo-", dir=directory)
        try:
            records, on_disk = [], []
            for i, item in enumerate(self):
                stored, aliases = untie(item.state_dict)
                weights = f"model_{i:05d}.safetensors"
                save_safetensors(stored, os.path.join(staging, weights), {"format": FORMAT})
                cond = None
                if item.condition is not None:
                    cond = f"condition_{i:05d}.safetensors"
                    save_safetensors(
                        {"condition": item.condition},
                        os.path.join(staging, cond),
                        {"format": FORMAT},
                    )
                records.append(
                    {
                        "weights": weights,
                        "condition": cond,
                        "meta": item.meta,
                        **({"aliases": aliases} if aliases else {}),
                    }
                )
                on_disk.append(
                    _OnDisk(
                        os.path.join(directory, weights),
                        cond and os.path.join(directory, cond),
                        item.meta,
                        aliases,
                    )
                )
            spec = self._spec
            save_json(
                os.path.join(staging, MANIFEST),
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "layout": {
                        k: {"shape": list(s), "dtype": str(d).removeprefix("torch.")}
                        for k, (s, d) in (spec.layout.items() if spec else ())
                    },
                    "condition": None
                    if spec is None or spec.condition is None
                    else dict(zip(("rank", "features"), spec.condition)),
                    "items": records,
                },
            )
            new = sorted(os.listdir(staging), key=lambda f: f == MANIFEST)  # zoo.json last
            for name in new:
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # Items read from disk now read the files just written (they hold the same tensors),
        # so this zoo stays valid even if ``directory`` was where it read them from.
        self._items = [
            on_disk[i] if isinstance(item, _OnDisk) else item for i, item in enumerate(self._items)
        ]
        for path in old - {os.path.join(directory, name) for name in new}:
            try:  # files of the replaced zoo that the new one does not use
                os.remove(path)
            except OSError:
                pass

    @staticmethod
    def _referenced_files(directory: str) -> set[str]:
        """The model and condition files of the zoo in ``directory`` (none if there is none)."""
        try:
            _, items = _parse_manifest(read_json(os.path.join(directory, MANIFEST)), directory)
        except (D2NWGError, KeyError, TypeError, ValueError, AttributeError):
            return set()
        return {p for item in items for p in (item.weights, item.condition) if p is not None}

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> ModelZoo:
        """The zoo saved in ``directory``. Reads zoo.json only; items are read when accessed.

        A missing or malformed zoo.json raises FileFormatError naming it; a missing, corrupt or
        mismatching model or condition file raises FileFormatError naming that file when its
        item is accessed.
        """
        directory = os.path.abspath(os.fspath(directory))
        path = os.path.join(directory, MANIFEST)
        manifest = read_json(path)
        try:
            spec, items = _parse_manifest(manifest, directory)
        except KeyError as exc:
            raise FileFormatError(f"{path}: missing field {exc}") from exc
        except ValueError as exc:
            raise FileFormatError(f"{path}: {exc}") from exc
        except (TypeError, AttributeError) as exc:  # a field of the wrong JSON type
            raise FileFormatError(f"{path}: malformed: {exc}") from exc
        zoo = cls()
        zoo._spec, zoo._items = spec, items
        return zoo
