"""Synthesis: latent sequences sampled from a condition (guidance, the sampler call), decoded
by the VAE, and written into state dicts, a live model or shards.

A :class:`Synthesizer` holds a trained generator's parts; :meth:`Synthesizer.start` checks the
sampling options and encodes the condition once (a :class:`SampleRun`). The sampler's state is
the latent sequence of whole models ``[B, T, d]`` (C/d times smaller than their weights); at
every step :class:`WindowedDenoiser` cuts it into the layout's windows, denoises them in
batches and gives each token the average of its windows' predictions (one window per token
when they do not overlap). Each block of tokens draws its starting noise from its own
generator ``noise_seed(seed, sample, block)``, so a sample is the same whatever else shares
its sampler run. Decoding and writing stream: a batch of tokens at a time.
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
from d2nwg.training import DistContext
from d2nwg.windows import WindowLayout


@dataclass
class SamplingOptions:
    """How :meth:`D2NWG.generate` and friends sample; None takes the config's default.

    ``seed``: sample i of a seed is the same whatever ``num_samples`` is; ``sampler``,
    ``steps``, ``guidance_scale`` (classifier-free guidance), ``eta`` (DDIM); ``device``;
    ``cuda_graph`` (capture the sampler loop once, replay it for every batch);
    ``batch_windows``: windows per denoiser call, and streaming's tokens per write in windows
    (None: about ``BATCH_ELEMENTS`` decoded values on the device).
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
    batch: int  # windows per denoiser call
    latents: torch.Tensor | None = None  # sample 0 of task 0 [T, d], once streaming samples it


class WindowedDenoiser:
    """The denoiser called as :func:`d2nwg.sample` calls a model, ``model(x, t, cond)``, on
    latent sequences ``x [r, T, d]`` (under guidance the cond rows, then the uncond rows):
    every window of every row is denoised, ``batch`` windows per denoiser call, and each
    token gets the average of its windows' predictions. Every tensor it indexes with is
    built once per row count, so a CUDA graph captured on it replays.

    The prediction is averaged in whatever space the denoiser predicts (epsilon, v or x0):
    the windows of a token all see the same ``x_t`` there, and each space is an affine
    function of another at fixed ``x_t``, so the three averages are the same update.

    One process adds each batch's predictions into the ``[r, T, d]`` answer as they come
    (no buffer of every window's prediction): a token's first window assigns, the later ones
    add, in window order, so the sum is :meth:`WindowLayout.blend`'s whatever the batches.
    With several ranks in ``ctx``, rank k computes every world-th batch into a zeroed buffer
    of every window's slots, one all-reduce per step sums them, which is exact (each slot
    has one nonzero term), and every rank blends: the bits one process computes.
    """

    def __init__(
        self,
        den: LatentDenoiser,
        win: WindowLayout,
        batch: int,
        device: torch.device,
        ctx: DistContext | None = None,
    ):
        self.den, self.win, self.batch, self.device = den, win, batch, device
        self.ctx = ctx or DistContext()
        self.layout = {
            k: None if v is None else v.to(device) for k, v in win.denoiser_layout().items()
        }
        self.index = win.index.to(device)
        self.blend_plan = win.blend_plan(device)
        self.plans: dict[int, list[Batch]] = {}  # rows -> the batches of a call

    def batches(self, rows: int) -> list[Batch]:
        """The denoiser calls of a call on ``rows`` sequences (built once per row count)."""
        if rows not in self.plans:
            self.plans[rows] = plan_batches(self.win, rows, self.batch, self.device)
        return self.plans[rows]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        win, ctx = self.win, self.ctx
        r, NW, W, d = x.shape[0], win.num_windows, win.size, x.shape[2]
        if win.padded:  # padding slots read a zero token after the last one
            x = torch.cat([x, x.new_zeros(r, 1, d)], 1)
        if ctx.world_size > 1:
            slots = x.new_zeros(r * NW, W, d)
            for k, job in enumerate(self.batches(r)):
                if k % ctx.world_size == ctx.rank:
                    slots[job.start : job.stop] = self.denoise(job, x, t, cond)
            ctx.all_reduce_(slots)
            return win.blend(slots.view(r, NW, W, d), self.blend_plan)
        out = x.new_empty(r * win.num_tokens, d)
        for job in self.batches(r):
            flat = self.denoise(job, x, t, cond).reshape(-1, d)
            for k, (src, dst, weight) in enumerate(job.adds):
                if k == 0:
                    out[dst] = flat[src] if weight is None else flat[src] * weight
                else:
                    out.index_add_(0, dst, flat[src] * weight)
        return out.view(r, win.num_tokens, d)

    def denoise(self, job: Batch, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The denoiser's predictions ``[n, W, d]`` for one batch of (row, window) jobs."""
        windows = x[job.rows[:, None], self.index[job.windows]]  # gathered when needed
        layout = {n: None if v is None else v[job.windows] for n, v in self.layout.items()}
        with bf16_autocast(x.is_cuda, cache_enabled=False):  # as in training
            pred = self.den(windows, t[job.rows], _rows(cond, job.rows), **layout)
        return pred.to(x.dtype)


@dataclass
class Batch:
    """One denoiser call of :class:`WindowedDenoiser`: jobs ``start .. stop - 1`` of the
    row-major (row, window) list, their ``rows`` and ``windows``, and per rank k of a
    token's windows ``adds[k] = (slot, destination, weight)``: the call's flat slots
    ``[n * W]`` whose token has its k-th window here, the flat ``row * T + token`` they go
    to, and their weights ``[m, 1]`` (None when every token lies in one window)."""

    start: int
    stop: int
    rows: torch.Tensor
    windows: torch.Tensor
    adds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def plan_batches(win: WindowLayout, rows: int, batch: int, device: torch.device) -> list[Batch]:
    """The batches of ``batch`` (row, window) jobs over ``rows`` sequences, row-major."""
    NW, T = win.num_windows, win.num_tokens
    rank, weight = win.slot_ranks()
    K = win.cover.shape[1]
    out = []
    for a in range(0, rows * NW, batch):
        b = min(a + batch, rows * NW)
        job = torch.arange(a, b)
        row, w = job // NW, job % NW
        dst = (row[:, None] * T + win.index[w]).flatten()
        slot_rank, slot_weight = rank[w].flatten(), weight[w].flatten()
        adds = []
        for k in range(K):
            src = torch.nonzero(slot_rank == k).squeeze(1)
            wk = None if K == 1 else slot_weight[src, None].to(device)
            adds.append((src.to(device), dst[src].to(device), wk))
        out.append(Batch(a, b, row.to(device), w.to(device), adds))
    return out


def _rows(cond: Any, rows: torch.Tensor) -> Any:
    """The condition of each job: ``cond``'s rows ``rows`` (a Condition, a packed tensor or
    None)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, rows)
    return cond.index_select(rows)


@dataclass
class Synthesizer:
    """A trained generator's parts, as sampling and decoding use them. ``bound``: the
    windowed denoisers already built, per (device, batch, ranks), shared across calls so that
    CUDA graphs captured on one replay for every later sampler run of that shape."""

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

    def start_noise(self, run: SampleRun, samples: list[int]) -> tuple[torch.Tensor, list]:
        """The starting latents ``[n, T, d]`` of these samples and one generator per sample
        for the sampler's later noise. Block k of the layout's noise blocks draws from
        ``noise_seed(seed, sample, k)``; the sampler's noise continues block 0's stream."""
        win, d = self.windows, self.config.latent_dim
        x_T = torch.empty(len(samples), win.num_tokens, d)
        gens, blocks = [], win.noise_blocks()
        for n, i in enumerate(samples):
            for k, (a, b) in enumerate(blocks):
                g = torch.Generator().manual_seed(noise_seed(run.opts.seed, i, k))
                x_T[n, a:b] = torch.randn(win.size, d, generator=g)[: b - a]
                if k == 0:
                    gens.append(g)
        return x_T, gens

    @torch.no_grad()
    def sample_latents(
        self, run: SampleRun, jobs: torch.Tensor, ctx: DistContext | None = None
    ) -> torch.Tensor:
        """Sampled latent sequences ``[n, T, d]`` (in the diffusion's scale) of ``jobs [n, 2]``
        = (task, sample) rows: one sampler run over all of them."""
        c, opts = self.config, run.opts
        tasks, samples = jobs.unbind(1)
        x_T, gens = self.start_noise(run, samples.tolist())
        return sample(
            self.windowed(run, ctx),
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

    def windowed(self, run: SampleRun, ctx: DistContext | None = None) -> WindowedDenoiser:
        """One bound denoiser per (device, batch, ranks): CUDA graphs of it replay."""
        ctx = ctx or DistContext()
        # run.batch windows per call, whether guided or not: the activations of a call are
        # what streaming holds besides the latent state
        key = (run.device, run.batch, ctx.rank, ctx.world_size)
        if key not in self.bound:
            den = self.model.denoiser
            self.bound[key] = WindowedDenoiser(den, self.windows, run.batch, run.device, ctx)
        return self.bound[key]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Chunk tokens ``[..., C]`` of sampled latents ``[..., d]``."""
        return self.vae.decode(z / self.latent_scale, max_batch=65536)

    def resident(self, run: SampleRun, ctx: DistContext | None = None) -> torch.Tensor:
        """The latent sequence ``[T, d]`` of sample 0 of task 0, sampled on first use and kept
        on ``run``: what streaming decodes and writes, a batch of tokens at a time. Under
        ``ctx`` with several ranks every rank must call this (the sampler's steps are shared
        out, see :class:`WindowedDenoiser`)."""
        if run.latents is None:
            run.latents = self.sample_latents(run, torch.zeros(1, 2, dtype=torch.long), ctx)[0]
        return run.latents

    def write_tokens(
        self, run: SampleRun, dests: Mapping[str, torch.Tensor], start: int, stop: int
    ) -> None:
        """Decode tokens ``start .. stop - 1`` of the resident sample and write them (added,
        for a delta generator) into ``dests``: one batch of streaming generation."""
        tokens = self.decode(self.resident(run)[start:stop])
        self.tokenizer.write_range(dests, tokens, start, accumulate=self.config.delta)

    @torch.no_grad()
    def tokens(self, run: SampleRun, num_samples: int) -> torch.Tensor:
        """Generated chunk tokens ``[tasks * num_samples, T, C]`` (task-major order): sampled
        latents decoded by the VAE, ready for the tokenizer's detokenize (residuals from the
        base, for a delta generator). A sampler run holds about ``run.batch`` windows."""
        win = self.windows
        grid = torch.cartesian_prod(torch.arange(run.tasks), torch.arange(num_samples))
        grid = grid.reshape(-1, 2)  # task-major, then sample
        out = torch.empty(grid.shape[0], win.num_tokens, self.config.chunk_size, device=run.device)
        rows = max(1, run.batch // win.num_windows)
        for j in range(0, grid.shape[0], rows):
            out[j : j + rows] = self.decode(self.sample_latents(run, grid[j : j + rows]))
        return out

    def stream_into(
        self, run: SampleRun, dests: Mapping[str, torch.Tensor], ctx: DistContext | None = None
    ) -> None:
        """Sample 0 of task 0 written into ``dests``, a batch of ``run.batch`` windows' tokens
        at a time; with several ranks in ``ctx``, they share the sampling and each writes
        every world-th batch (cut the same way whatever the world size)."""
        ctx = ctx or DistContext()
        self.resident(run, ctx)
        batches = self.windows.token_batches(0, self.windows.num_tokens, run.batch)
        for k, (start, stop) in enumerate(batches):
            if k % ctx.world_size == ctx.rank:
                self.write_tokens(run, dests, start, stop)
