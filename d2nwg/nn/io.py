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
import json
import os
from typing import Any, Iterator, TypeVar

import torch

from d2nwg.errors import ConfigError, FileFormatError, KeyMismatchError
from d2nwg.files import read_safetensors, save_safetensors

C = TypeVar("C", bound="JSONConfig")
FORMAT = "d2nwg.module/1"


class JSONConfig:
    """Mixin for ``@dataclass`` configs of plain JSON values (numbers, strings, bools, lists)."""

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
        return cls(**kwargs)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: invalid JSON ({exc})") from exc
        return cls.from_dict(data)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the body under ``torch.manual_seed(seed)``, restoring the CPU RNG afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def save_module(module: torch.nn.Module, path: str | os.PathLike, *,
                metadata: dict[str, str] | None = None) -> None:
    """Write ``module.state_dict()`` (and its ``config``, if any) to a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
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


def load_module(target, path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                strict: bool = True) -> torch.nn.Module:
    """Load a file written by :func:`save_module`.

    ``target`` is either a module instance (its parameters are overwritten) or a module class
    with a ``config_class`` attribute (it is rebuilt from the config stored in the file).
    """
    meta = read_metadata(path)
    if isinstance(target, type):
        config_class = getattr(target, "config_class", None)
        if config_class is None or "config" not in meta:
            raise FileFormatError(f"{os.fspath(path)}: cannot rebuild {target.__name__} "
                                  "(no config stored, or the class has no config_class)")
        if meta.get("class") != target.__name__:
            raise FileFormatError(f"{os.fspath(path)}: holds a {meta.get('class')}, "
                                  f"not a {target.__name__}")
        module = target(config_class.from_json(meta["config"]))
    else:
        module = target
    _, state = read_safetensors(path, device=map_location)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise KeyMismatchError(f"{os.fspath(path)}: missing keys {missing[:8]}, "
                               f"unexpected keys {unexpected[:8]}")
    for key in set(own) & set(state):
        if own[key].shape != state[key].shape:
            raise FileFormatError(f"{os.fspath(path)}: {key} has shape "
                                  f"{tuple(state[key].shape)}, the module has {tuple(own[key].shape)}")
    module.load_state_dict(state, strict=strict)
    return module
