"""What both demos share: fitting the generator (under torchrun too) and writing the report."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from d2nwg.files import save_json
from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.training import DistContext, LossLog
from d2nwg.zoo import ModelZoo


def fit_generator(
    config: D2NWGConfig, zoo: ModelZoo, out: str, progress: bool, seconds: dict[str, float]
) -> tuple[D2NWG, DistContext]:
    """Fit on ``zoo`` (logs and checkpoints in ``out/train``), note each stage's seconds, and
    save the generator to ``out/generator`` on rank 0."""
    gen = D2NWG(config).fit(zoo, out=os.path.join(out, "train"), progress=progress)
    seconds["fit_vae"] = gen.history["vae_seconds"]
    seconds["fit_diffusion"] = gen.history["diffusion_seconds"]
    ctx = DistContext.from_env(torch.device("cpu"))
    if ctx.is_main:
        gen.save(os.path.join(out, "generator"))
    return gen, ctx


def write_report(
    results: dict,
    out: str,
    table: Callable[[dict], str],
    plots: Callable[[dict, list[dict], str], list[str]],
) -> None:
    """``out/results.json``, the printed table and the plots (with the loss log of the fit)."""
    save_json(os.path.join(out, "results.json"), results)
    print(table(results))
    for path in plots(results, LossLog(os.path.join(out, "train"), enabled=False).read(), out):
        print(f"wrote {path}")
    print(
        f"wrote {os.path.join(out, 'results.json')} and the generator in "
        f"{os.path.join(out, 'generator')}"
    )
