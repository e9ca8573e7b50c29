"""Synthesis: latent windows sampled from a condition (guidance, the sampler call), decoded by
the VAE, and written into state dicts, a live model or shards.

A :class:`Synthesizer` holds a trained generator's parts; :meth:`Synthesizer.start` checks the
sampling options and encodes the condition once (a :class:`SampleRun`), then each batch of
(task, sample, window) jobs is one sampler run over the batch (:meth:`sample_windows`). Every
window's noise comes from its own generator ``noise_seed(seed, sample, window)``, so a window is
the same whatever else shares its batch, its process or the number of samples asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from d2nwg.devices import bf16_autocast
from d2nwg.errors import ConfigError, ShapeError
from d2nwg.generator.conditions import parse_conditions
from d2nwg.generator.config import BATCH_ELEMENTS, D2NWGConfig
from d2nwg.generator.networks import ConditionalDenoiser
from d2nwg.nn import ChunkVAE, Condition, LatentDenoiser
from d2nwg.sampling import sample
from d2nwg.schedule import NoiseSchedule
from d2nwg.seeds import noise_seed
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.windows import WindowLayout


@dataclass
class SamplingOptions:
    """How :meth:`D2NWG.generate` and friends sample; None takes the config's default.

    ``seed``: sample i of a seed is the same whatever ``num_samples`` is; ``sampler``,
    ``steps``, ``guidance_scale`` (classifier-free guidance), ``eta`` (DDIM); ``device``;
    ``cuda_graph`` (capture the sampler loop once, replay it for every batch);
    ``batch_windows``: windows per sampler run (None: about ``BATCH_ELEMENTS`` decoded values
    on the device).
    """

    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    eta: float = 0.0
    device: str | torch.device | None = None
    cuda_graph: bool = False
    batch_windows: int | None = None

    @classmethod
    def parse(cls, sampling: dict[str, Any]) -> SamplingOptions:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(sampling) - set(names))
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {unknown}; choose from {names}")
        opts = cls(**sampling)
        for name, least in (("seed", 0), ("batch_windows", 1)):
            v = getattr(opts, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise ConfigError(f"{name} must be an int >= {least}, got {v!r}")
        return opts


@dataclass
class SampleRun:
    """One generation call: options checked, condition encoded, schedule on the device."""

    opts: SamplingOptions
    device: torch.device
    tasks: int
    cond: Condition | None  # one row per task
    uncond: Condition | None  # the null condition, under guidance
    guidance_scale: float
    schedule: NoiseSchedule
    batch: int  # windows per sampler run


class WindowedDenoiser:
    """The denoiser called as :func:`d2nwg.sample` calls a model, ``model(x, t, cond)``, on a
    batch of ``rows`` windows whose layout (positions, kinds, padding mask) sits in static
    buffers: :meth:`load` refills them for the next batch, so a CUDA graph captured on this
    object replays for every batch. Under guidance the batch comes twice (cond rows, then
    uncond rows), and so does the layout."""

    def __init__(self, den: LatentDenoiser, win: WindowLayout, rows: int, device: torch.device):
        self.den = den
        self.layout = {
            k: None if v is None else v.new_zeros(2, rows, *v.shape[1:], device=device)
            for k, v in win.denoiser_layout().items()
        }

    def load(self, win: WindowLayout, windows: torch.Tensor) -> None:
        for k, src in win.denoiser_layout().items():
            if src is not None:
                self.layout[k].copy_(src[windows].expand_as(self.layout[k]))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        layout = {
            k: None if v is None else v.flatten(0, 1)[: x.shape[0]] for k, v in self.layout.items()
        }
        with bf16_autocast(x.is_cuda, cache_enabled=False):  # as in training
            return self.den(x, t, cond, **layout).to(x.dtype)


@dataclass
class Synthesizer:
    """A trained generator's parts, as sampling and decoding use them. ``bound``: the
    windowed denoisers already built, per (device, rows), shared across calls so that CUDA
    graphs captured on one replay for every later batch of that shape."""

    config: D2NWGConfig
    tokenizer: WeightTokenizer
    windows: WindowLayout
    vae: ChunkVAE
    model: ConditionalDenoiser
    latent_scale: float
    cond_rank: int
    bound: dict[tuple, WindowedDenoiser] = field(default_factory=dict)

    def start(self, condition, sampling: dict[str, Any], max_tasks: int = 0) -> SampleRun:
        """Check the sampling options, encode the condition, put the networks on the device."""
        opts = SamplingOptions.parse(sampling)
        device = (
            torch.device(opts.device)
            if opts.device is not None
            else next(self.model.parameters()).device
        )
        self.model.to(device).eval()
        self.vae.to(device).eval()
        c, den = self.config, self.model.denoiser
        raw, tasks = parse_conditions(condition, c.condition, self.cond_rank, c.cond_features)
        if max_tasks and tasks > max_tasks:
            raise ShapeError(f"pass the condition of one task here, got {tasks} tasks")
        scale = c.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
        cond = uncond = None
        if raw is None:
            scale = 1.0  # nothing to guide towards
        else:
            with torch.no_grad():
                cond = self.model.encode(raw.to(device))
            if scale != 1.0:
                uncond = den.null_condition(1, device)
        W, C = self.windows.size, c.chunk_size
        return SampleRun(
            opts=opts,
            device=device,
            tasks=tasks,
            cond=cond,
            uncond=uncond,
            guidance_scale=scale,
            schedule=c.noise_schedule().to(device),
            batch=opts.batch_windows or max(1, BATCH_ELEMENTS[device.type] // (W * C)),
        )

    @torch.no_grad()
    def sample_windows(self, run: SampleRun, jobs: torch.Tensor) -> torch.Tensor:
        """Decoded tokens ``[r, C]`` of the real slots of ``jobs [n, 3]`` = (task, sample,
        window) rows, job by job: one sampler run over the batch, then the VAE decodes the
        real latents only. The noise of (sample i, window w) comes from its own generator, so
        a window is the same whatever else shares its batch or process."""
        c, win, opts = self.config, self.windows, run.opts
        tasks, samples, windows = jobs.unbind(1)
        gens = [
            torch.Generator().manual_seed(noise_seed(opts.seed, i, w))
            for i, w in zip(samples.tolist(), windows.tolist())
        ]
        x_T = torch.stack([torch.randn(win.size, c.latent_dim, generator=g) for g in gens])
        model = self.windowed(run.device, len(gens))
        model.load(win, windows)
        z = sample(
            model,
            x_T.to(run.device),
            run.schedule,
            sampler=opts.sampler or c.sampler,
            steps=opts.steps or c.sample_steps,
            eta=opts.eta,
            cond=None if run.cond is None else run.cond.index_select(tasks.to(run.device)),
            uncond=run.uncond,
            guidance_scale=run.guidance_scale,
            generator=gens,
            prediction_type=c.prediction_type,
            cuda_graph=opts.cuda_graph,
        )
        real = win.mask[windows]
        z = z.flatten(0, 1) if bool(real.all()) else z[real.to(run.device)]
        return self.vae.decode(z / self.latent_scale, max_batch=65536)

    def windowed(self, device: torch.device, rows: int) -> WindowedDenoiser:
        """One bound denoiser per (device, batch): CUDA graphs of it replay across batches."""
        key = (device, rows)
        if key not in self.bound:
            self.bound[key] = WindowedDenoiser(self.model.denoiser, self.windows, rows, device)
        return self.bound[key]

    def write_windows(
        self, run: SampleRun, dests: Mapping[str, torch.Tensor], first: int, stop: int
    ) -> None:
        """Sample windows ``first .. stop - 1`` of sample 0 of task 0 and write them (added,
        for a delta generator) into ``dests``: one batch of streaming generation."""
        w = torch.arange(first, stop)
        jobs = torch.stack([torch.zeros_like(w), torch.zeros_like(w), w], 1)
        tokens = self.sample_windows(run, jobs)  # the windows' tokens, in token order
        start = self.windows.spans[first][0]
        self.tokenizer.write_range(dests, tokens, start, accumulate=self.config.delta)

    @torch.no_grad()
    def tokens(self, run: SampleRun, num_samples: int) -> torch.Tensor:
        """Generated chunk tokens ``[tasks * num_samples, T, C]`` (task-major order): sampled
        latents decoded by the VAE, ready for the tokenizer's detokenize (residuals from the
        base, for a delta generator)."""
        win, T = self.windows, self.tokenizer.num_tokens
        B = run.tasks * num_samples
        grid = torch.cartesian_prod(
            torch.arange(run.tasks), torch.arange(num_samples), torch.arange(win.num_windows)
        ).reshape(-1, 3)  # task-major, then sample, then window
        out = torch.empty(B, T, self.config.chunk_size, device=run.device)
        for j in range(0, grid.shape[0], run.batch):
            jobs = grid[j : j + run.batch]
            rows = (jobs[:, 0] * num_samples + jobs[:, 1])[:, None].expand(-1, win.size)
            real = win.mask[jobs[:, 2]]
            index = win.index[jobs[:, 2]][real]
            out[rows[real].to(run.device), index.to(run.device)] = self.sample_windows(run, jobs)
        return out

    def stream_into(
        self, run: SampleRun, dests: Mapping[str, torch.Tensor], rank: int = 0, world: int = 1
    ) -> None:
        """Sample 0 of task 0, batch of windows by batch, written into ``dests``; with
        ``world`` > 1, this rank writes every ``world``-th batch (the batches are cut the same
        way whatever the world size)."""
        batches = self.windows.batches(0, self.windows.num_windows, run.batch)
        for k, (first, stop) in enumerate(batches):
            if k % world == rank:
                self.write_windows(run, dests, first, stop)
