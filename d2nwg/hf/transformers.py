"""``transformers`` models as targets of generation.

:meth:`d2nwg.D2NWG.generate_into` writes into any ``nn.Module``, a ``PreTrainedModel``
included: its tied weights (``lm_head.weight`` and ``model.embed_tokens.weight`` of a model
with ``tie_word_embeddings``, HF's ``_tied_weights_keys``) are one tensor, which the layout
holds once (a zoo of ``model.state_dict()`` keeps the tie) and writes once.

:meth:`d2nwg.D2NWG.generate_to_directory` with ``model_config=`` (a ``PretrainedConfig``, or a
``PreTrainedModel`` whose config is taken) also writes ``config.json``, so that
``AutoModelForCausalLM.from_pretrained(directory)`` loads the shards. The layout is checked
against the architecture first (built on the meta device from the config: no memory, no
download): every generated tensor must be one of the model's, of the same shape. Tied names
are stored once in the shards, which is what ``from_pretrained`` expects (it ties the others
itself); the model's tensors that the generator does not produce (``include``/``exclude``)
are left to ``from_pretrained``, which initializes them (a warning names them).

The name of this module is that of the package it adapts; it imports that package (through
:func:`d2nwg.hf.require`) only inside its functions.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence

import torch
from torch import nn

from d2nwg.errors import ConfigError, KeyMismatchError, ShapeError, warn_at_caller
from d2nwg.hf import require
from d2nwg.tensors import storage_key
from d2nwg.tokenizer import LayerSpec

CONFIG = "config.json"


def _is(obj: object, name: str) -> bool:
    """Whether ``obj`` is a ``transformers.<name>`` (False when transformers is not imported:
    then it cannot be one)."""
    module = sys.modules.get("transformers")
    return module is not None and isinstance(obj, getattr(module, name))


def is_pretrained_model(obj: object) -> bool:
    return _is(obj, "PreTrainedModel")


def resolve(target: object):
    """(config, model or None) of a ``PreTrainedModel`` or a ``PretrainedConfig``."""
    if is_pretrained_model(target):
        return target.config, target
    if _is(target, "PretrainedConfig"):
        return target, None
    raise ConfigError(
        f"model_config must be a transformers PretrainedConfig or PreTrainedModel, "
        f"got {type(target).__name__}"
    )


def meta_model(config) -> nn.Module:
    """The model of ``config`` on the meta device (shapes and ties, no memory): the class its
    ``architectures`` names, else ``AutoModelForCausalLM``."""
    transformers = require("transformers")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        with torch.device("meta"):
            if cls is not None:
                return cls._from_config(config)
            return transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(
            f"cannot build the model of this {type(config).__name__} to check the layout "
            f"against ({type(exc).__name__}: {exc}); pass the PreTrainedModel itself"
        ) from exc


def check_layout(layers: Sequence[LayerSpec], model: nn.Module) -> list[str]:
    """Raise KeyMismatchError / ShapeError unless every tensor of the layout (tied names
    included) is one of ``model``'s, of the same shape. Returns the model's tensors that the
    shards will not hold: neither generated nor tied in the model to a generated one."""
    named = model.state_dict(keep_vars=True)
    arch = type(model).__name__
    names = [n for spec in layers for n in (spec.name, *spec.aliases)]
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyMismatchError(
            f"the generator's layout has tensors that {arch} lacks: {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    for spec in layers:
        for n in (spec.name, *spec.aliases):
            if tuple(named[n].shape) != spec.shape:
                raise ShapeError(
                    f"{arch}'s {n!r} has shape {tuple(named[n].shape)}; the generator's layout "
                    f"has {spec.shape}"
                )
    # What the shards hold: each layer once, under its name; a tied name is produced only
    # where the model ties it too (from_pretrained fills it then; a model that keeps it
    # separate would not get it).
    written = {storage_key(named[spec.name]) for spec in layers}
    return [n for n, t in named.items() if storage_key(t) not in written]


def target_config(layers: Sequence[LayerSpec], target: object) -> dict:
    """The ``config.json`` to write beside the shards of ``layers`` for ``target`` (a
    PreTrainedModel or PretrainedConfig), once the layout is checked against its
    architecture; warns naming the tensors the shards will not hold."""
    config, model = resolve(target)
    uncovered = check_layout(layers, model if model is not None else meta_model(config))
    if uncovered:
        warn_at_caller(
            f"{len(uncovered)} tensors of the model are outside the generator's layout and "
            f"not in the shards; from_pretrained will initialize them: {uncovered[:8]}"
        )
    if model is not None:  # what save_pretrained records
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
    return json.loads(config.to_json_string(use_diff=True))
