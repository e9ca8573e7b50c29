"""``fit``: a zoo in, a trained generator's parts out. The sequence, each step one call: the
process group and this rank's share of the zoo, the resolved config and tokenizer, the zoo's
statistics and tokens, the conditions, the networks, then the two stages (resuming from the
newest checkpoint when asked) and the latent scale between them."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Literal

import torch

from d2nwg.devices import resolve_device
from d2nwg.errors import ConfigError
from d2nwg.generator import stages
from d2nwg.generator.conditions import RawConditions, condition_rank
from d2nwg.generator.config import D2NWGConfig, resolve_for
from d2nwg.generator.delta import Base
from d2nwg.generator.networks import ConditionalDenoiser, Parts, build_networks
from d2nwg.nn import ChunkVAE
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.training import Checkpoints, DistContext, LossLog, TrainingRun, writer_lock
from d2nwg.windows import WindowLayout
from d2nwg.zoo import ModelZoo

Resume = bool | Literal["auto"]


def check_resume(resume: Resume, out) -> None:
    if resume not in (True, False, "auto"):
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume and out is None:
        raise ConfigError(f"resume={resume!r} needs the out directory of the run to resume")


def fit(
    config: D2NWGConfig,
    zoo: ModelZoo,
    out: str | os.PathLike | None = None,
    resume: Resume = False,
    progress: bool = True,
    base=None,
) -> tuple[Parts, dict]:
    """Train a generator on ``zoo`` (see :meth:`d2nwg.D2NWG.fit`): its parts, and how the run
    went (seconds per stage, steps/s, world size)."""
    if not isinstance(zoo, ModelZoo) or len(zoo) == 0:
        raise ConfigError(f"fit() needs a non-empty ModelZoo, got {type(zoo).__name__}")
    check_resume(resume, out)
    device = resolve_device(config.device)
    ctx = DistContext.from_env(device)
    share = zoo.shard(ctx.rank, ctx.world_size) if ctx.active else zoo
    if len(share) == 0:
        raise ConfigError(
            f"rank {ctx.rank} has no model of the zoo's {len(zoo)} (world size {ctx.world_size})"
        )
    first = zoo[0]
    rank = condition_rank(config.condition, first.condition)
    features = 0 if first.condition is None else first.condition.shape[-1]
    c, tok, windows = resolve_for(config, first.state_dict, features)
    delta = Base.of(c.delta, tok, base)
    residual = delta.residual if delta is not None else (lambda sd: sd)
    # Statistics over the whole zoo (a cheap streaming pass), identical on every rank.
    tok.fit(map(residual, zoo.state_dicts()))
    tokens = tok.tokenize([residual(sd) for sd in share.state_dicts()])  # [M, T, C]
    raw, max_classes = None, 0
    if c.condition != "none":
        raw = RawConditions.stack([item.condition for item in share], rank, c.cond_features)
        # condition slots: the most classes (dataset) or tokens (text) of any zoo condition
        max_classes = ctx.max(raw.x.shape[1])
    vae, model = build_networks(c, len(tok.kind_names), max_classes)

    run = TrainingRun(device, ctx, Checkpoints(out) if out is not None else None,
                      LossLog(out, ctx.is_main), progress, c.loop(), {"vae": vae})  # fmt: skip
    with writer_lock(ctx, out) if out is not None else contextlib.nullcontext():
        latent_scale, history = train(run, c, tok, windows, vae, model, tokens, raw, resume)
    parts = Parts(c, tok, windows, vae, model, latent_scale, rank, max_classes,
                  zoo.adapter_config)  # fmt: skip
    return parts, history


def train(
    run: TrainingRun,
    c: D2NWGConfig,
    tok: WeightTokenizer,
    windows: WindowLayout,
    vae: ChunkVAE,
    model: ConditionalDenoiser,
    tokens: torch.Tensor,
    raw: RawConditions | None,
    resume: Resume,
) -> tuple[float, dict]:
    """Both stages, from the newest checkpoint when resuming: the latent scale and how the run
    went (seconds per stage, steps/s, world size)."""
    device, ctx = run.device, run.ctx
    state = resume_state(run, resume)
    history: dict = {}
    t0 = time.perf_counter()
    vae.to(device)
    if state is None or state["stage"] == "vae":
        stages.train_vae(run, c, vae, tokens, tok.mask, state)
        state = None
    else:
        vae.load_state_dict(state["modules"]["vae"])
    history["vae_seconds"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    latents, latent_scale = stages.encode_latents(vae, tokens, ctx)
    model.to(device)
    stages.train_diffusion(run, c, model, windows, latents, raw, state)
    history["diffusion_seconds"] = time.perf_counter() - t1
    history["world_size"] = ctx.world_size
    if run.steps_per_s:
        history["steps_per_s"] = run.steps_per_s
    ctx.barrier()
    return latent_scale, history


def resume_state(run: TrainingRun, resume: Resume) -> dict | None:
    """The checkpoint a run continues from: the newest one when resuming (``"auto"``: None
    when there is none, and the run starts fresh); a fresh run first clears an earlier run's
    checkpoints and log, so that it cannot resume from them later."""
    ckpt, ctx = run.ckpt, run.ctx
    state = ckpt.latest() if (resume and ckpt is not None) else None
    if ctx.is_main:
        if state is None:
            run.log.clear()
            if ckpt is not None:
                ckpt.clear()
        elif ckpt is not None:
            ckpt.remove_partial()
    ctx.barrier()
    if state is not None and state["world_size"] != ctx.world_size:
        raise ConfigError(
            f"the checkpoint was written by {state['world_size']} processes; "
            f"resume with the same number (now {ctx.world_size})"
        )
    return state
