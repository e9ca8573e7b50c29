"""What both demos share: how a run is set up, its stopwatch, fitting the generator (under
torchrun too) and writing the report."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from d2nwg.files import save_json
from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.training import DistContext, LossLog
from d2nwg.zoo import ModelZoo


@dataclass(frozen=True)
class DemoOptions:
    """How a demo runs, whichever demo it is (its settings say what it computes)."""

    out: str = "demo_out"  # results.json, plots, the generator, training logs
    device: str = "auto"  # of the generator: auto, cpu, cuda or cuda:N
    seed: int = 0
    quick: bool = False  # the smaller preset, when no settings are given
    progress: bool = True  # progress bars while fitting
    sampler: str | None = None  # how candidates are sampled (None: the generator's default)
    steps: int | None = None
    condition: str = "dataset"  # the digits demo: "dataset" (support sets) or "text" (names)
    model: str = "head"  # the digits demo: what is generated, "head", "mlp" or "cnn"
    window: int | None = None  # the generator's window (None: the demo's setting)

    def sampling(self) -> dict[str, Any]:
        """The sampling options the demo passes to ``generate`` (only those set)."""
        return {
            k: v for k, v in (("sampler", self.sampler), ("steps", self.steps)) if v is not None
        }


def sampling_used(gen: D2NWG, options: DemoOptions) -> dict[str, Any]:
    """What the candidates were sampled with (results.json's ``sampling``)."""
    c = gen.config
    return {
        "sampler": options.sampler or c.sampler,
        "steps": options.steps or c.sample_steps,
        "guidance_scale": c.guidance_scale,
    }


class Stopwatch:
    """Wall-clock seconds of each stage of a run, and its total since the watch was made."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start

    def total(self) -> dict[str, float]:
        self.seconds["total"] = time.perf_counter() - self._start
        return self.seconds


def fit_generator(
    zoo: ModelZoo,
    options: DemoOptions,
    watch: Stopwatch,
    *,
    vae_steps: int,
    diffusion_steps: int,
    **config: Any,
) -> tuple[D2NWG, DistContext]:
    """Fit a generator conditioned on ``options.condition`` on ``zoo`` (logs and checkpoints
    in ``out/train``), note each stage's seconds, and save it to ``out/generator`` on rank 0.
    ``config``: the demo's other :class:`D2NWGConfig` fields (steps left at 0: the library's
    defaults)."""
    defaults = D2NWGConfig().resolve(1, 1)
    cfg = D2NWGConfig(
        condition=options.condition,
        vae_steps=vae_steps,
        diffusion_steps=diffusion_steps,
        # one checkpoint, at the end
        checkpoint_every=max(
            vae_steps or defaults.vae_steps, diffusion_steps or defaults.diffusion_steps
        ),  # fmt: skip
        device=options.device,
        seed=options.seed,
        **config,
    )
    out = options.out
    gen = D2NWG(cfg).fit(zoo, out=os.path.join(out, "train"), progress=options.progress)
    watch.seconds["fit_vae"] = gen.history["vae_seconds"]
    watch.seconds["fit_diffusion"] = gen.history["diffusion_seconds"]
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
