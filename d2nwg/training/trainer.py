"""The training loop both stages share: AdamW, warm-up and cosine decay, gradient clipping,
an optional EMA, checkpoints, the loss log and progress bars, under DDP when distributed.

It knows nothing of what is trained: a stage hands it a module and ``loss_fn(trained,
generator)``, which computes one batch's loss from random draws of ``generator`` (all of the
stage's randomness, so a resumed run draws exactly what an uninterrupted one would).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from d2nwg.devices import bf16_autocast
from d2nwg.errors import NonFiniteError
from d2nwg.seeds import stage_seed
from d2nwg.training.checkpoints import Checkpoints
from d2nwg.training.distributed import DistContext
from d2nwg.training.ema import EMA
from d2nwg.training.log import LossLog
from d2nwg.training.lr import lr_factor

LossFn = Callable[[nn.Module, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class LoopConfig:
    """How every stage's loop runs (the generator's config fills it)."""

    seed: int = 0
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the stage's steps
    grad_clip: float = 1.0
    log_every: int = 25
    checkpoint_every: int = 500


@dataclass(frozen=True)
class Stage:
    """One stage: its name, its index in the run (checkpoint order), steps and learning rate."""

    name: str
    index: int
    steps: int
    lr: float


@dataclass
class TrainingRun:
    """Where and how one fit runs: device, process group, checkpoints, log, progress bars; and
    the modules every checkpoint carries besides the trained one (the VAE, for stage 2)."""

    device: torch.device
    ctx: DistContext
    ckpt: Checkpoints | None
    log: LossLog
    progress: bool
    loop: LoopConfig
    carried: dict[str, nn.Module] = field(default_factory=dict)
    steps_per_s: dict[str, float] = field(default_factory=dict)


def optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))


def train_stage(
    run: TrainingRun,
    stage: Stage,
    module: nn.Module,
    loss_fn: LossFn,
    state: dict | None = None,
    ema: EMA | None = None,
) -> None:
    """Train ``module`` for ``stage.steps`` steps (from ``state``'s step, when resuming).

    A loss or gradient norm that turns NaN or Inf stops the run with :class:`NonFiniteError`
    naming the stage and step, before anything of that step reaches a checkpoint or the log.
    """
    loop, device, ctx = run.loop, run.device, run.ctx
    gen = torch.Generator().manual_seed(stage_seed(loop.seed, ctx.rank, stage.index))
    trained = module
    if ctx.active:
        trained = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = optimizer(module.parameters(), stage.lr, loop.weight_decay)
    start = 0 if state is None else _restore(run, stage, state, module, opt, gen, ema)
    warmup = int(loop.warmup * stage.steps)
    bar = _progress(run.progress and ctx.is_main, stage.steps, start, stage.name)
    # the first step whose loss or gradient norm was not finite (-1: none), kept on the device
    # and read only where the loop syncs anyway (log and checkpoint steps)
    first_bad = torch.tensor(-1, device=device)
    module.train()
    tick, tick_step = time.perf_counter(), start
    stage_t0 = tick
    for step in range(start, stage.steps):
        for group in opt.param_groups:
            group["lr"] = stage.lr * lr_factor(step, stage.steps, warmup)
        loss, norm = _step(trained, module, loss_fn, gen, opt, loop.grad_clip, device)
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
        if ema is not None:
            ema.update(module)
        done = step + 1
        logging = done % loop.log_every == 0 or done == stage.steps
        saving = run.ckpt is not None and (done % loop.checkpoint_every == 0 or done == stage.steps)
        if logging or saving:
            _stop_if_not_finite(ctx, stage, int(first_bad))
        if logging:
            now = time.perf_counter()
            value = float(ctx.all_reduce_(loss.detach().float().clone())) / ctx.world_size
            rate = (done - tick_step) / max(now - tick, 1e-9)
            run.log.write(stage=stage.name, step=done, loss=value, grad_norm=float(norm),
                          lr=opt.param_groups[0]["lr"], steps_per_s=rate)  # fmt: skip
            bar.set_postfix(loss=f"{value:.4f}", steps_per_s=f"{rate:.1f}")
            tick, tick_step = now, done
        bar.update(1)
        if saving:
            _checkpoint(run, stage, done, module, opt, gen, ema)
    bar.close()
    module.eval()
    if stage.steps > start:
        run.steps_per_s[stage.name] = (stage.steps - start) / (time.perf_counter() - stage_t0)


def _restore(
    run: TrainingRun,
    stage: Stage,
    state: dict,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    ema: EMA | None,
) -> int:
    """Load a checkpoint's module, optimizer, this rank's generator and EMA; drop the log
    lines the resumed run writes again. Returns the step to continue from."""
    module.load_state_dict(state["modules"]["trained"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"][run.ctx.rank])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    run.log.truncate_after(stage.name, state["step"])
    return state["step"]


def _step(
    trained: nn.Module,
    module: nn.Module,
    loss_fn: LossFn,
    gen: torch.Generator,
    opt: torch.optim.Optimizer,
    grad_clip: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: the loss (bf16 on CUDA), its gradient clipped to ``grad_clip``.
    Returns the loss and the gradient norm before clipping."""
    with bf16_autocast(device.type == "cuda"):
        loss = loss_fn(trained, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    return loss, norm


def _stop_if_not_finite(ctx: DistContext, stage: Stage, first_bad: int) -> None:
    """Every rank stops together when any rank's loss turned non-finite."""
    if ctx.any(first_bad >= 0):
        where = f"step {first_bad + 1}" if first_bad >= 0 else "a step of another rank"
        raise NonFiniteError(
            f"training stage {stage.name!r}: the loss or its gradient turned NaN or Inf at "
            f"{where}; stopped, the last checkpoint is left as it was (lower the learning "
            "rate or check the zoo's weights and conditions)"
        )


def _checkpoint(
    run: TrainingRun,
    stage: Stage,
    step: int,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    ema: EMA | None,
) -> None:
    rng = run.ctx.all_gather(gen.get_state())  # every rank's generator, for an exact resume
    if run.ctx.is_main:
        modules = {"trained": module.state_dict()}
        modules.update({name: m.state_dict() for name, m in run.carried.items()})
        run.ckpt.save(stage.index, stage.name, step, {
            "stage": stage.name, "step": step, "world_size": run.ctx.world_size,
            "modules": modules, "optimizer": opt.state_dict(), "rng": rng,
            "ema": None if ema is None else ema.state_dict(),
        })  # fmt: skip
    run.ctx.barrier()


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False,
                dynamic_ncols=True)  # fmt: skip
