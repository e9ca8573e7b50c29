"""PEFT adapter folders in and out: ``adapter_config.json`` and ``adapter_model.safetensors``,
the two files ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` loads.

Neither ``peft`` nor ``transformers`` is needed here: the config is JSON, the weights are
safetensors keyed by PEFT's own names (``base_model.model.<module>.lora_A.weight``: the
module path in the base model, the adapter name left out), which a zoo keeps as they are and
an adapter written here carries back. ``adapter_model.bin`` (a pickle) is refused: d2nwg never
unpickles a file it did not write.

The adapters of one zoo must share :data:`SHARED_FIELDS`: the base model, the PEFT type, the
target modules, rank and alpha, and the switches that change what the same tensors mean
(rsLoRA's scaling, DoRA, transposed weights, per-module ranks and alphas). Dropout, the task
type or the PEFT version may differ. The first adapter's config is the zoo's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from d2nwg.errors import ConfigError, FileFormatError
from d2nwg.files import read_json, save_json, save_safetensors
from d2nwg.tensors import storage_key

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
# What every adapter of a zoo shares: the five fields first, then the switches that
# change what the same tensors mean (a missing field reads as None).
SHARED_FIELDS = (
    "base_model_name_or_path",
    "peft_type",
    "target_modules",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
)
SAMPLE_FOLDER = "sample_{:05d}"  # one folder per generated adapter


@dataclass(frozen=True)
class Adapter:
    """One PEFT adapter folder: its absolute path, its weights file and its config."""

    folder: str
    weights: str
    config: dict


def _json_default(value: object) -> object:
    """What json cannot write as is: sets (PeftConfig's target modules) as sorted lists."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def check_config(config: object, where: str, error: type = ConfigError) -> dict:
    """A PEFT adapter config: a JSON object with a ``peft_type`` (``error`` naming ``where``
    otherwise), or a ``peft.PeftConfig``; returned as a plain JSON copy (sets as lists, as
    PEFT saves them)."""
    if not isinstance(config, Mapping) and callable(getattr(config, "to_dict", None)):
        config = config.to_dict()  # a peft.PeftConfig
    if not isinstance(config, Mapping):
        raise error(f"{where}: a PEFT adapter config is a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("peft_type"), str):
        raise error(f"{where}: no 'peft_type' string: not a PEFT adapter config")
    try:
        return json.loads(json.dumps(dict(config), allow_nan=False, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: the adapter config is not JSON-serializable: {exc}") from exc


def config_to_write(kept: Mapping | None, given: Mapping | None) -> dict:
    """The adapter config a generator writes: ``given``, else the one it ``kept`` from its
    zoo; ConfigError when there is neither."""
    config = kept if given is None else given
    if config is None:
        raise ConfigError(
            "this generator has no PEFT adapter config (its zoo was not made by "
            "ModelZoo.from_peft, nor given one): pass adapter_config="
        )
    return check_config(config, "adapter_config")


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """The adapter in ``folder``; FileFormatError naming the folder or file when it is missing,
    holds a pickle instead of safetensors, or has an unreadable config."""
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigError(f"a PEFT adapter folder is a path, got {type(folder).__name__}")
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileFormatError(f"{folder}: no such PEFT adapter folder")
    config_path = os.path.join(folder, CONFIG)
    config = check_config(read_json(config_path), config_path, FileFormatError)
    weights = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.exists(os.path.join(folder, PICKLE)):
            raise FileFormatError(
                f"{folder}: holds {PICKLE}, a pickle, which d2nwg does not load (unpickling "
                f"runs code); save the adapter as {WEIGHTS} (PEFT's default, "
                f"safe_serialization=True)"
            )
        raise FileFormatError(f"{folder}: no {WEIGHTS} beside {CONFIG}")
    return Adapter(folder, weights, config)


def _comparable(value: object) -> object:
    """A config value as compared across adapters: target module lists as sets."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    return value


def read_adapters(paths: Iterable[str | os.PathLike]) -> list[Adapter]:
    """The adapters in ``paths``, in order; the first whose config differs from the first
    adapter's in a :data:`SHARED_FIELDS` field raises ConfigError naming its folder and the
    field."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise ConfigError(
            f"from_peft takes a list of adapter folders, got the single path {paths!r}; pass [path]"
        )
    adapters = [read_adapter(p) for p in paths]
    if not adapters:
        raise ConfigError("from_peft needs at least one adapter folder")
    first = adapters[0]
    for a in adapters[1:]:
        for field in SHARED_FIELDS:
            mine, theirs = a.config.get(field), first.config.get(field)
            if _comparable(mine) != _comparable(theirs):
                raise ConfigError(
                    f"{a.folder}: {CONFIG} has {field}={mine!r}, but the first adapter "
                    f"({first.folder}) has {field}={theirs!r}; the adapters of a zoo share "
                    f"{', '.join(SHARED_FIELDS)}"
                )
    return adapters


def natural_order(names: Iterable[str]) -> list[str]:
    """Names with digit runs compared as numbers (``layers.2`` before ``layers.10``): the
    module order of a model, which a safetensors file (sorted by name) does not keep."""

    def key(name: str) -> list:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

    return sorted(names, key=key)


def write_adapter(folder: str, state_dict: Mapping[str, torch.Tensor], config: Mapping) -> None:
    """One adapter folder: the weights under their names (tied names get copies: PEFT loads
    every name, and safetensors refuses shared memory), then ``adapter_config.json`` (last:
    a folder with its config is whole). Each file is written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set = set()
    for name, t in state_dict.items():
        key = storage_key(t)
        t = t.detach().cpu().contiguous()
        tensors[name] = t.clone() if key in seen else t
        seen.add(key)
    save_safetensors(tensors, os.path.join(folder, WEIGHTS), {"format": "pt"})
    save_json(os.path.join(folder, CONFIG), dict(config))


def write_adapters(
    directory: str, state_dicts: Sequence[Mapping[str, torch.Tensor]], config: Mapping
) -> list[str]:
    """``directory/sample_00000``, ``sample_00001``, ...: one adapter folder per state dict,
    all with ``config``. Returns the folders."""
    config = check_config(config, "adapter_config")
    folders = []
    for i, sd in enumerate(state_dicts):
        folder = os.path.join(directory, SAMPLE_FOLDER.format(i))
        write_adapter(folder, sd, config)
        folders.append(folder)
    return folders
