"""Generated weights as a directory of safetensors shards with an index, the layout Hugging
Face uses for large checkpoints (``model-00001-of-0000N.safetensors`` and
``model.safetensors.index.json``), written as they stream out of the sampler."""

from __future__ import annotations

import os
from typing import Any

import torch

from d2nwg.files import save_json, save_safetensors
from d2nwg.generator.delta import Base
from d2nwg.generator.synthesis import SampleRun, Synthesizer
from d2nwg.tokenizer import LayerSpec
from d2nwg.training import DistContext

INDEX = "model.safetensors.index.json"
FORMAT = "d2nwg.D2NWG"  # the index's "generator" entry


def shard_layers(layers: list[LayerSpec], shard_size: int) -> list[list[int]]:
    """Consecutive layer indices in shards of at most ``shard_size`` bytes (a larger layer
    alone in its shard)."""
    shards: list[list[int]] = []
    size = 0
    for s, spec in enumerate(layers):
        nbytes = spec.numel * spec.torch_dtype.itemsize
        if not shards or size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def write_shards(
    synth: Synthesizer,
    run: SampleRun,
    directory: str,
    shard_size: int,
    base: Base | None,
    ctx: DistContext,
    extra_json: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample 0 of ``run`` into shards of ``directory``; this rank writes every
    ``world``-th shard, rank 0 the JSON files of ``extra_json`` (file name -> object, e.g. a
    transformers ``config.json``) and then the index, last. Returns the index."""
    tok, win = synth.tokenizer, synth.windows
    synth.resident(run, ctx)  # every rank takes part in sampling the model's latents
    shards = shard_layers(tok.layers, shard_size)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for k, layers in enumerate(shards):
        if k % ctx.world_size != ctx.rank:
            continue
        specs = [tok.layers[s] for s in layers]
        tensors = {
            spec.name: base.copy(spec.name, spec.torch_dtype, run.device)
            if base is not None
            else torch.empty(spec.shape, dtype=spec.torch_dtype, device=run.device)
            for spec in specs
        }
        start, stop = tok.token_range(layers)
        for a, b in win.token_batches(start, stop, run.batch) if stop > start else ():
            synth.write_tokens(run, tensors, a, b)
        save_safetensors(
            {n: t.cpu() for n, t in tensors.items()},
            os.path.join(directory, names[k]),
            metadata={"format": "pt"},
        )
    index = {
        "metadata": {
            "total_size": sum(s.numel * s.torch_dtype.itemsize for s in tok.layers),
            "generator": FORMAT,
            "delta": synth.config.delta,
            "aliases": {a: s.name for s in tok.layers for a in s.aliases},
        },
        "weight_map": {
            tok.layers[s].name: names[k] for k, layers in enumerate(shards) for s in layers
        },
    }
    ctx.barrier()
    if ctx.is_main:
        for name, obj in (extra_json or {}).items():
            save_json(os.path.join(directory, name), obj)
        save_json(os.path.join(directory, INDEX), index)
    ctx.barrier()
    return index
