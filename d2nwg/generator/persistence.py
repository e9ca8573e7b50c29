"""The generator's directory: ``config.json`` (format, version, the resolved config, the latent
scale, the condition's rank and class slots, and the PEFT adapter config of a generator of
adapters) and one safetensors file per component, saved and loaded by one loop over
:data:`COMPONENTS` (diffusers' ``model_index.json`` idea).

``adapter_config`` is optional (absent from generators of plain models and from those written
before it existed), so the format stays version 1: every earlier directory loads, and an
earlier d2nwg loads a generator of adapters (without the adapter config)."""

from __future__ import annotations

import math
import os

import torch

from d2nwg.errors import ConfigError, FileFormatError
from d2nwg.files import read_json, save_json
from d2nwg.generator.config import D2NWGConfig
from d2nwg.generator.networks import Parts, build_networks
from d2nwg.nn import load_module, save_module
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.windows import WindowLayout

FORMAT = "d2nwg.D2NWG"
FORMAT_VERSION = 1
CONFIG = "config.json"
TOKENIZER = "tokenizer.safetensors"
# file -> the module of a generator's parts it holds (None: this generator has none)
COMPONENTS = {
    "vae.safetensors": lambda p: p.vae,
    "denoiser.safetensors": lambda p: p.model.denoiser,
    "encoder.safetensors": lambda p: p.model.encoder,
}


def save(parts: Parts, directory: str) -> None:
    """Every file written atomically, ``config.json`` last (a directory without it is not a
    generator, so a save cut short is never loaded half-new)."""
    os.makedirs(directory, exist_ok=True)
    parts.tokenizer.save(os.path.join(directory, TOKENIZER))
    for name, module_of in COMPONENTS.items():
        module = module_of(parts)
        if module is not None:
            save_module(module, os.path.join(directory, name))
    save_json(
        os.path.join(directory, CONFIG),
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": parts.config.to_dict(),
            "latent_scale": parts.latent_scale,
            "cond_rank": parts.cond_rank,
            "max_classes": parts.max_classes,
            **({"adapter_config": parts.adapter_config} if parts.adapter_config else {}),
        },
    )


def load(directory: str, device: str | torch.device = "cpu") -> Parts:
    """A generator's parts written by :func:`save`; bad files raise :class:`FileFormatError`."""
    path = os.path.join(directory, CONFIG)
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FileFormatError(f"{path}: not a d2nwg generator (format {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: format_version {version!r}; this d2nwg reads 1..{FORMAT_VERSION}"
        )
    try:
        config = D2NWGConfig.from_dict(meta["config"])
        latent_scale = float(meta["latent_scale"])
        cond_rank = int(meta["cond_rank"])
        max_classes = int(meta["max_classes"])
        adapter_config = meta.get("adapter_config")
        if adapter_config is not None and not isinstance(adapter_config, dict):
            raise TypeError(f"adapter_config is a {type(adapter_config).__name__}, not an object")
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise FileFormatError(f"{path}: {exc}") from exc
    if not (math.isfinite(latent_scale) and latent_scale > 0):
        raise FileFormatError(f"{path}: latent_scale {latent_scale} is not positive")
    tok = WeightTokenizer.load(os.path.join(directory, TOKENIZER))
    vae, model = build_networks(config, len(tok.kind_names), max_classes)
    windows = WindowLayout.from_tokenizer(tok, config.window, config.window_stride,
                                          config.class_rows)  # fmt: skip
    parts = Parts(config, tok, windows, vae, model,
                  latent_scale, cond_rank, max_classes, adapter_config)  # fmt: skip
    for name, module_of in COMPONENTS.items():
        module = module_of(parts)
        if module is not None:
            load_module(module, os.path.join(directory, name))
    return parts.to(device)
