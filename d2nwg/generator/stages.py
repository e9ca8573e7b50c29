"""The two training stages, each testable on its own: stage 1 trains the ChunkVAE on chunk
tokens, the zoo is encoded once into latents scaled to unit standard deviation, and stage 2
trains the latent denoiser with its condition encoder. Both run on the shared loop of
:mod:`d2nwg.training.trainer`."""

from __future__ import annotations

import math

import torch
from torch import nn

from d2nwg.errors import NonFiniteError
from d2nwg.generator.conditions import RawConditions
from d2nwg.generator.config import WINDOW_DRAWS, D2NWGConfig
from d2nwg.generator.networks import ConditionalDenoiser, VAELoss
from d2nwg.nn import ChunkVAE
from d2nwg.training import EMA, DistContext, Stage, TrainingRun, train_stage
from d2nwg.windows import WindowLayout

STAGES = ("vae", "diffusion")  # in run order: a checkpoint's stage index


def stage(c: D2NWGConfig, name: str) -> Stage:
    steps, lr = (c.vae_steps, c.vae_lr) if name == "vae" else (c.diffusion_steps, c.lr)
    return Stage(name, STAGES.index(name), steps, lr)


def train_vae(
    run: TrainingRun,
    c: D2NWGConfig,
    vae: ChunkVAE,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    state: dict | None = None,
) -> None:
    """Stage 1 on random real chunks of the zoo's tokens ``[M, T, C]``; ``mask [T, C]``: the
    tokenizer's real entries (the loss ignores padding; all-padding tokens are never drawn)."""
    T = tokens.shape[1]
    flat = tokens.reshape(-1, c.chunk_size)  # [M*T, C]
    real = torch.nonzero(mask.any(1).repeat(tokens.shape[0])).squeeze(1)
    mask = mask.to(run.device)

    def loss_fn(trained: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = real[torch.randint(real.numel(), (c.vae_batch,), generator=gen)]
        return trained(flat[idx].to(run.device), mask[(idx % T).to(run.device)], gen)

    train_stage(run, stage(c, "vae"), VAELoss(vae), loss_fn, state)


@torch.no_grad()
def encode_latents(
    vae: ChunkVAE, tokens: torch.Tensor, ctx: DistContext
) -> tuple[torch.Tensor, float]:
    """The zoo's latents ``[M, T, d]`` (the encoder's means) times the latent scale, and that
    scale: ``1 / sqrt(mean(mu^2))`` over every rank's latents, so that diffusion sees latents of
    unit second moment whatever the VAE's own scale (a peer's whole-model generation collapsed
    until its latents' scale was fixed)."""
    vae.eval()
    device = next(vae.parameters()).device
    mu = vae.encode_mean(tokens.to(device), max_batch=65536)  # [M, T, d]
    sq = ctx.all_reduce_(
        torch.tensor([mu.double().square().sum().item(), mu.numel()], dtype=torch.float64)
    )
    mean_square = float(sq[0] / sq[1])
    if not (math.isfinite(mean_square) and mean_square > 0):
        raise NonFiniteError(
            f"the VAE's latents have mean square {mean_square!r}: no latent scale "
            "(the VAE stage diverged or the zoo's tokens are all zero)"
        )
    scale = float(1.0 / math.sqrt(mean_square))
    return (mu * scale).float(), scale


def window_pairs(c: D2NWGConfig, num_models: int, num_windows: int) -> int:
    """(model, window) pairs per diffusion step. Windowed, one window per model would give a
    step 1/windows of the tokens whole-model training sees: on the digits heads (4 windows)
    that cost more at equal steps than the windows themselves (README, "What windows cost"),
    so a step draws up to WINDOW_DRAWS windows per model."""
    pairs = min(c.batch_size, num_models)
    if num_windows > 1:
        pairs = c.window_batch or pairs * min(num_windows, WINDOW_DRAWS)
    return pairs


def draw_windows(win: WindowLayout, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``win`` to train on. Windows at every offset (stride 1, what
    overlapping layouts train on) hold the first and last tokens once and a middle token W
    times: drawn uniformly, the sequence's ends (a classifier's output layer, the input layer)
    would see a W-th of the training the middle sees. So the start is drawn uniformly from
    ``[-(W - 1), T - 1]`` and clamped to a window: a token lies in W (the ends, the middle)
    to 2W - 1 (W - 1 from an end) of the ``T + W - 1`` starts, never less than the middle."""
    if win.stride != 1:  # aligned windows: every token lies in exactly one
        return torch.randint(win.num_windows, (n,), generator=gen)
    W, NW = win.size, win.num_windows
    start = torch.randint(NW + 2 * (W - 1), (n,), generator=gen) - (W - 1)
    return start.clamp(0, NW - 1)


def train_diffusion(
    run: TrainingRun,
    c: D2NWGConfig,
    model: ConditionalDenoiser,
    windows: WindowLayout,
    latents: torch.Tensor,
    raw: RawConditions | None,
    state: dict | None = None,
) -> None:
    """Stage 2 on the scaled latents ``[M, T, d]`` and their raw conditions: random (model,
    window) pairs, timesteps and noise; condition dropout for classifier-free guidance; an EMA
    of the weights, which ``model`` holds at the end (what the generator samples with)."""
    device, win = run.device, windows.for_training()
    schedule = c.noise_schedule().to(device)
    M, d = latents.shape[0], latents.shape[2]
    # A zero latent after the last token: where the windows' padding slots point.
    latents = torch.cat([latents, latents.new_zeros(M, 1, d)], 1).to(device)
    raw = raw.to(device) if raw is not None else None
    layout = {k: None if v is None else v.to(device) for k, v in win.denoiser_layout().items()}
    index = win.index.to(device)
    ema = EMA(model, c.ema_decay)
    pairs = window_pairs(c, M, win.num_windows)

    def loss_fn(trained: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(M, (pairs,), generator=gen)
        w = torch.zeros_like(idx)  # (one window: no draw, the same stream as ever)
        if win.num_windows > 1:
            w = draw_windows(win, idx.numel(), gen)
        t = torch.randint(c.timesteps, (idx.numel(),), generator=gen)
        noise = torch.randn(idx.numel(), win.size, d, generator=gen)
        idx, w = idx.to(device), w.to(device)
        models, cond_index = idx, None
        if win.num_windows > 1:  # a model's windows share one encoding of its condition
            models, cond_index = torch.unique(idx, return_inverse=True)
        return trained(
            latents[idx[:, None], index[w]],
            t.to(device),
            noise.to(device),
            None if raw is None else raw[models],
            schedule,
            c.cond_drop,
            gen,
            cond_index=cond_index,
            **{k: None if v is None else v[w] for k, v in layout.items()},
        )

    train_stage(run, stage(c, "diffusion"), model, loss_fn, state, ema)
    ema.copy_to(model)
