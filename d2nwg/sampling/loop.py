"""The sampling loop: one model call and one fused step per timestep, in place.

A :class:`Plan` holds everything a run needs on the sampling device (made once by
:func:`d2nwg.sampling.api.prepare`); :func:`run_steps` is the loop that both the eager path
(:func:`run_eager`) and a captured CUDA graph (:mod:`d2nwg.sampling.cuda_graph`) run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from d2nwg.errors import DTypeError, ShapeError


@dataclass
class Plan:
    """Everything a run needs, on the sampling device; shared by the eager and graph loops."""

    model: Callable
    shape: tuple[int, ...]  # x_T's shape [B, ...]
    B: int
    N: int
    guided: bool
    table: torch.Tensor  # [S, K] float32/float64
    t_table: torch.Tensor  # [S, B or 2B] int64: the model's t at each step
    step_idx: torch.Tensor  # [S] int64: arange (the device-side step index)
    noise_steps: tuple[bool, ...]  # whether step k adds noise
    use_prev: bool  # multistep samplers: keep the previous x0
    use_prev2: bool  # DPM-Solver++(3M), UniPC: and the one before it
    run: Callable  # the selected backend of the fused step
    draw: Callable[[], torch.Tensor]  # one step's noise [B, N]

    @property
    def S(self) -> int:
        return len(self.noise_steps)


def check_model_output(plan: Plan, out: Any) -> None:
    rows = 2 * plan.B if plan.guided else plan.B
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"model(x_t, t, cond) must return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != (rows,) + plan.shape[1:]:
        raise ShapeError(
            f"model(x_t, t, cond) returned shape {tuple(out.shape)}, expected "
            f"{(rows,) + plan.shape[1:]} (the shape of its input x_t)"
        )
    if not out.is_floating_point():
        raise DTypeError(f"model(x_t, t, cond) returned dtype {out.dtype}")


def run_steps(
    plan: Plan,
    x: torch.Tensor,
    prev: torch.Tensor | None,
    prev2: torch.Tensor | None,
    cond_in: Any,
    noise: Callable[[int], torch.Tensor | None],
) -> None:
    """S steps in place on x [B, N] (and the x0 history prev, prev2): one model call and one
    fused kernel per step.

    Per step this does only the model call (on a cat of x with itself under guidance) and the
    fused op: the timesteps and step indices are views made once, the state is updated in
    place (so its model-shaped view stays valid).
    """
    model, run, table, guided = plan.model, plan.run, plan.table, plan.guided
    rows, N, dtype = (2 * plan.B if guided else plan.B), plan.N, x.dtype
    x_model = x.view(plan.shape)
    t_views = list(plan.t_table.unbind(0))  # [S] views, made once
    s_views = list(plan.step_idx.unbind(0))
    for k in range(plan.S):
        x_in = torch.cat([x_model, x_model]) if guided else x_model
        out = model(x_in, t_views[k], cond_in)
        check_model_output(plan, out)  # every step: a later change of shape must not pass
        out = out.reshape(rows, N)
        if out.dtype != dtype:
            out = out.to(dtype)
        if not out.is_contiguous():
            out = out.contiguous()
        run(x, out, table, s_views[k], noise(k), prev, guided, prev2)
        # Drop this step's input and prediction before the next step makes its own: on a
        # whole model's latent sequence they are the largest tensors of the loop.
        del x_in, out


def run_eager(plan: Plan, x: torch.Tensor, cond_in: Any) -> torch.Tensor:
    """The loop without a CUDA graph: noise drawn step by step; returns ``x``."""
    prev = torch.zeros_like(x) if plan.use_prev else None
    prev2 = torch.zeros_like(x) if plan.use_prev2 else None
    run_steps(plan, x, prev, prev2, cond_in, lambda k: plan.draw() if plan.noise_steps[k] else None)
    return x


def noise_drawer(
    generator, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Callable[[], torch.Tensor]:
    """One step's standard normal noise [B, ...]; with a list of generators, row i comes from
    generator i alone (so sample i does not depend on the rest of the batch)."""
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if generator is None:
        return lambda: torch.randn(shape, dtype=draw_dtype, device=device).to(dtype)
    if isinstance(generator, torch.Generator):
        g = generator
        return lambda: torch.randn(shape, generator=g, dtype=draw_dtype, device=g.device).to(
            device, dtype
        )
    gens = list(generator)

    def draw() -> torch.Tensor:
        rows = [
            torch.randn(shape[1:], generator=g, dtype=draw_dtype, device=g.device).to(device, dtype)
            for g in gens
        ]
        return torch.stack(rows)

    return draw
