"""``sample()``: check the arguments, plan the run, and run it eagerly or as a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from d2nwg.backends import select
from d2nwg.errors import warn_at_caller
from d2nwg.ops.sampler_step_op import SAMPLER_STEP_BACKENDS
from d2nwg.sampling.checks import check_arguments, check_cond, check_generator
from d2nwg.sampling.cuda_graph import run_with_graph
from d2nwg.sampling.loop import Plan, noise_drawer, run_eager
from d2nwg.sampling.tables import device_tables
from d2nwg.sampling.timesteps import resolve_timesteps
from d2nwg.schedule import NoiseSchedule


@torch.no_grad()
def sample(
    model: Callable,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    eta: float = 0.0,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prediction_type: str = "epsilon",
    backend: str | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Run a diffusion sampler from ``x_T`` and return x_0 (same shape and dtype).

    Args:
        model: ``model(x_t, t, cond) -> prediction`` shaped like ``x_t``; ``t`` is a LongTensor
            ``[B]`` of training timesteps (``[2B]``, cond rows then uncond rows, under guidance).
        x_T: the starting noise ``[B, ...]`` (float32, float16, bfloat16 or float64).
        schedule: the training :class:`~d2nwg.schedule.NoiseSchedule`.
        sampler: one of :data:`d2nwg.SAMPLERS`: ``"ddpm"`` (ancestral), ``"ddim"``,
            ``"dpmpp_2m"`` (DPM-Solver++(2M)), and for few steps ``"dpmpp_3m"``
            (DPM-Solver++(3M)) or ``"unipc"`` (UniPC-2, B(h) = e^h - 1).
        steps: number of steps, ``1 <= steps <= T``; timesteps ``round(T - i * T / steps) - 1``.
        timesteps: explicit strictly descending timesteps in ``[0, T)``; overrides ``steps``.
        eta: DDIM's stochasticity (0 = deterministic, 1 = DDPM-like); DDIM only.
        cond, uncond: the model's condition; with ``guidance_scale != 1`` both are tensors (or
            both :class:`d2nwg.Condition`, packed here into tensors) with a
            batch dimension (``uncond``'s may be 1) and go through the model in one batched call
            per step, mixed as ``eps_u + s * (eps_c - eps_u)``.
        generator: one ``torch.Generator`` or a list of one per sample (sample i then depends
            only on ``x_T[i]`` and generator i); None uses the global RNG.
        prediction_type: what the model predicts: ``"epsilon"``, ``"v"`` or ``"sample"`` (x_0).
        backend: force a backend of the fused step ("torch", "cpp", "cuda", "triton").
        cuda_graph: on CUDA, capture the whole loop (model calls included) once per shape and
            replay it; falls back to the eager loop, with one warning, when capture fails.
    """
    args = dict(locals())  # sample's arguments by name: prepare takes all but cuda_graph
    del args["cuda_graph"]
    plan, x, cond_in = prepare(**args)
    if cuda_graph and x.device.type == "cuda":
        out = run_with_graph(plan, x, cond_in)
    else:
        if cuda_graph:
            warn_at_caller("cuda_graph=True needs CUDA tensors; running eagerly")
        out = run_eager(plan, x, cond_in)
    return out.view(x_T.shape)


def prepare(
    model,
    x_T,
    schedule,
    sampler,
    steps,
    timesteps,
    eta,
    cond,
    uncond,
    guidance_scale,
    generator,
    prediction_type,
    backend,
) -> tuple[Plan, torch.Tensor, Any]:
    """Validate the arguments of :func:`sample`; the plan, the state [B, N] and the cond."""
    check_arguments(model, x_T, schedule, sampler, prediction_type, eta)
    ts = resolve_timesteps(schedule.T, steps, timesteps)
    check_generator(generator, x_T.shape[0])
    B, device = x_T.shape[0], x_T.device
    cond_in, guided = check_cond(cond, uncond, guidance_scale, B, device)

    rows = 2 * B if guided else B
    tab_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    tables = device_tables(
        schedule,
        ts,
        sampler,
        prediction_type,
        float(eta),
        float(guidance_scale),
        tab_dtype,
        rows,
        device,
    )
    x = x_T.detach().reshape(B, -1).clone(memory_format=torch.contiguous_format)
    N = x.shape[1]
    plan = Plan(
        model=model,
        shape=tuple(x_T.shape),
        B=B,
        N=N,
        guided=guided,
        table=tables.table,
        t_table=tables.t_table,
        step_idx=tables.step_idx,
        noise_steps=tables.noise_steps,
        use_prev=tables.use_prev,
        use_prev2=tables.use_prev2,
        run=_noop,
        draw=noise_drawer(generator, tuple(x.shape), x.dtype, device),
    )
    impl = select(
        "sampler_step",
        SAMPLER_STEP_BACKENDS,
        x,
        x,
        plan.table,
        plan.step_idx[0],
        x if any(plan.noise_steps) else None,
        x if plan.use_prev else None,
        guided,
        x if plan.use_prev2 else None,
        backend=backend,
    )
    if N > 0:
        plan.run = impl.run
    return plan, x, cond_in


def _noop(*_) -> None:
    return None
