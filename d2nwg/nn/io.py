"""Configs that round-trip through JSON, seeded construction, and safetensors module files.

* :class:`JSONConfig`: a dataclass mixin with ``to_dict / from_dict / to_json / from_json``;
  unknown keys are rejected (a typo in a config file is an error, not a silent default).
* :func:`seeded`: build parameters under a fixed seed without touching the global RNG.
* :func:`save_module` / :func:`load_module`: ``state_dict`` to one safetensors file, written
  atomically (temporary file in the same directory, then ``os.replace``), with the module's
  config (when it has one) stored as JSON in the file's metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import types
import typing
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

from d2nwg.errors import (
    ConfigError,
    D2NWGError,
    DeviceError,
    DTypeError,
    FileFormatError,
    KeyMismatchError,
    NonFiniteError,
)
from d2nwg.files import all_finite, loads_json, read_safetensors, save_safetensors

C = TypeVar("C", bound="JSONConfig")
FORMAT = "d2nwg.module/1"


# Largest magnitude of an int config field: anything a seed or a step count may need, far
# below the 4300-digit integers Python would otherwise carry around.
MAX_CONFIG_INT = 2**64
# Fields that size tensors, by name, in every config (a class adds or overrides entries in
# its own ``size_limits``): a file asking for a width of 10**6 is refused by name before the
# module is built, not attempted (a [10**6, 10**6] float32 weight is 4 TB).
SIZE_LIMITS = {
    "dim": 2**16,
    "hidden_dim": 2**16,
    "latent_dim": 2**16,
    "cond_dim": 2**16,
    "vae_hidden_dim": 2**16,
    "in_features": 2**20,
    "in_dim": 2**20,
    "cond_features": 2**20,
    "timestep_freq_dim": 2**16,
    "num_inducing": 2**16,
    "num_null_tokens": 2**16,
    "max_cond_slots": 2**20,
    "num_layer_kinds": 2**20,
    "num_heads": 1024,
    "depth": 1024,
    "num_blocks": 1024,
    "vae_blocks": 1024,
    "shot_layers": 1024,
    "class_layers": 1024,
    "compression": 2**20,
    "mlp_ratio": 64,
    "timesteps": 2**20,
    "chunk_size": 2**20,
}


def _type_hints(cls) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not evaluate: check nothing by type
            hints = {}
        _HINTS[cls] = hints
    return hints


_HINTS: dict[type, dict[str, Any]] = {}
_JSON_SCALARS = (str, int, float, bool, type(None))


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is a valid JSON-config value of the annotated type ``hint``: a bool
    is no int, an int no str, NaN and Inf no float; containers hold JSON scalars."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_CONFIG_INT
        )
    if hint is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, _JSON_SCALARS) and not (isinstance(v, float) and not math.isfinite(v))
            for v in value
        )
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # Any, or a type this check does not know: the class's own checks decide


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is float:
        return "a finite float"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


class JSONConfig:
    """Mixin for ``@dataclass`` configs of plain JSON values (numbers, strings, bools, lists).

    Every field is checked against its annotation before the class's own ``__post_init__``
    runs (whether the config comes from a file or from code): ``chunk_size=True``,
    ``"chunk_size": "64"``, ``latent_dim=2.5`` or ``kl_weight=NaN`` raise :class:`ConfigError`
    naming the class and the field, and so do sizes beyond :data:`SIZE_LIMITS` (extended per
    class by a ``size_limits`` class attribute).
    """

    size_limits: typing.ClassVar[dict[str, int]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_types", False):

            @functools.wraps(own)
            def __post_init__(self, _own=own) -> None:
                self.check_field_types()
                _own(self)

            __post_init__._checks_types = True  # type: ignore[attr-defined]
            cls.__post_init__ = __post_init__  # type: ignore[attr-defined]

    def __post_init__(self) -> None:  # for configs without their own
        self.check_field_types()

    def check_field_types(self) -> None:
        """Raise ConfigError naming the first field whose value does not fit its type or size."""
        cls = type(self)
        hints = _type_hints(cls)
        limits = {**SIZE_LIMITS, **getattr(cls, "size_limits", {})}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            hint = hints.get(f.name)
            if hint is not None and not _matches(value, hint):
                raise ConfigError(
                    f"{cls.__name__}.{f.name} must be {_type_name(hint)}, got {_short_repr(value)}"
                )
            limit = limits.get(f.name)
            if (
                limit is not None
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and abs(value) > limit
            ):
                raise ConfigError(
                    f"{cls.__name__}.{f.name}={_short_repr(value)} is beyond the limit {limit}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {}
        for key, value in data.items():
            # JSON has no tuples: restore them where the default is a tuple.
            default = fields[key].default
            if isinstance(value, list) and isinstance(default, tuple):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, ArithmeticError) as exc:
            if isinstance(exc, D2NWGError):
                raise
            # a check of the class itself that met a value of an unexpected kind
            raise ConfigError(
                f"{cls.__name__}: invalid config ({type(exc).__name__}: {exc})"
            ) from exc

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False, **kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = loads_json(text, f"{cls.__name__} JSON")
        except FileFormatError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(data)


def _short_repr(value: Any) -> str:
    text = (
        repr(value)
        if not isinstance(value, int) or abs(value) < 10**30
        else f"an int of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    )
    return text if len(text) <= 80 else text[:77] + "..."


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the body under ``torch.manual_seed(seed)``, restoring the CPU RNG afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def save_module(
    module: torch.nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> None:
    """Write ``module.state_dict()`` (and its ``config``, if any) to a safetensors file atomically.

    Tied tensors (one storage under several names) are written once per name. Meta or sparse
    tensors, and any failure to write (a full disk), raise a D2NWGError naming the path.
    """
    where = os.fspath(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in module.state_dict().items():
        if not isinstance(v, torch.Tensor):
            raise DTypeError(f"{where}: state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise DeviceError(f"{where}: {k} is on the meta device (no values to save)")
        if v.layout != torch.strided:
            raise DTypeError(f"{where}: {k} has layout {v.layout}; only dense tensors are saved")
        t = v.detach().contiguous().cpu()
        storage = t.untyped_storage()._cdata
        if storage in seen:  # safetensors refuses shared storage: give each name its own copy
            t = t.clone()
        seen.add(t.untyped_storage()._cdata)
        tensors[k] = t
    meta = {"format": FORMAT, "class": type(module).__name__}
    config = getattr(module, "config", None)
    if isinstance(config, JSONConfig):
        meta["config"] = config.to_json()
    meta.update(metadata or {})
    save_safetensors(tensors, path, meta)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a file written by :func:`save_module`."""
    meta, _ = read_safetensors(path, load_tensors=False)
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _tensor_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype name)} of a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return out
    except Exception as exc:
        raise FileFormatError(f"{path}: not a readable safetensors file: {exc}") from exc


def load_module(
    target,
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> torch.nn.Module:
    """Load a file written by :func:`save_module`.

    ``target`` is either a module instance (its parameters are overwritten) or a module class
    with a ``config_class`` attribute (it is rebuilt from the config stored in the file).
    Rebuilding first checks the config by type and size, then builds the module on the meta
    device and compares every shape with the file's before allocating it: a config asking for
    more than the file holds is refused, never attempted. Float tensors are loaded only into
    float parameters; nothing is unpickled. A floating tensor holding NaN or Inf raises
    :class:`NonFiniteError` naming the file and the key, before any parameter is written.
    A ``target`` that is neither a module nor a module class raises :class:`ConfigError`.
    """
    if not (
        isinstance(target, torch.nn.Module)
        or (isinstance(target, type) and issubclass(target, torch.nn.Module))
    ):
        what = (
            f"the class {target.__qualname__}"
            if isinstance(target, type)
            else f"{_short_repr(target)} of type {type(target).__name__}"
        )
        raise ConfigError(f"load_module: target must be an nn.Module or a subclass, got {what}")
    where = os.fspath(path)
    meta = read_metadata(path)
    stored = _tensor_shapes(where)
    if isinstance(target, type):
        config_class = getattr(target, "config_class", None)
        if config_class is None or "config" not in meta:
            raise FileFormatError(
                f"{where}: cannot rebuild {target.__name__} "
                "(no config stored, or the class has no config_class)"
            )
        if meta.get("class") != target.__name__:
            raise FileFormatError(f"{where}: holds a {meta.get('class')}, not a {target.__name__}")
        try:
            config = config_class.from_json(meta["config"])
        except ConfigError as exc:
            raise FileFormatError(f"{where}: invalid config: {exc}") from exc
        try:
            with torch.device("meta"):
                skeleton = target(config)
        except D2NWGError as exc:
            raise FileFormatError(f"{where}: invalid config: {exc}") from exc
        try:  # the config must describe exactly the stored tensors
            _check_state_shapes(where, skeleton.state_dict(), stored, strict)
        except KeyMismatchError as exc:
            raise FileFormatError(
                f"{exc} (the stored config does not match the stored tensors)"
            ) from exc
        module = target(config)
    else:
        module = target
    own = module.state_dict()
    _check_state_shapes(where, own, stored, strict)
    _, state = read_safetensors(path, device=map_location)
    for key, t in state.items():
        if not all_finite(t):
            raise NonFiniteError(f"{where}: {key} holds NaN or Inf")
    module.load_state_dict(state, strict=strict)
    return module


def _check_state_shapes(
    where: str,
    own: dict[str, torch.Tensor],
    stored: dict[str, tuple[tuple[int, ...], str]],
    strict: bool,
) -> None:
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    if strict and (missing or unexpected):
        raise KeyMismatchError(
            f"{where}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    for key in sorted(set(own) & set(stored)):
        shape, dtype = stored[key]
        if tuple(own[key].shape) != shape:
            raise FileFormatError(
                f"{where}: {key} has shape {shape}, the module has {tuple(own[key].shape)}"
            )
        # safetensors dtype names: F16, BF16, F32, F64, F8_*, I64, U8, BOOL, ...
        if own[key].is_floating_point() != dtype.upper().startswith(("F", "BF")) or (
            own[key].dtype == torch.bool
        ) != (dtype.upper() == "BOOL"):
            raise FileFormatError(
                f"{where}: {key} is stored as {dtype}, the module holds {own[key].dtype}"
            )
