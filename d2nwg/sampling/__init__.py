"""Diffusion samplers (DDPM, DDIM, DPM-Solver++(2M) and (3M), UniPC) on the fused step op.

``sample(model, x_T, schedule, sampler=..., steps=...)`` runs the reverse process from
``x_T`` and returns the final sample x_0. Each step is one model call and one fused kernel
(:func:`d2nwg.ops.sampler_step_`): the samplers differ only in the per-step coefficients,
computed once, in float64, into a device table read at a device-side step index. After the
last timestep every sampler lands on alpha_bar = 1 (sigma = 0): its last step returns the
data prediction (DDIM, DPM-Solver++, UniPC) or the posterior mean with zero variance (DDPM).

One job per file:

    timesteps.py   which timesteps a run visits (trailing spacing, or explicit)
    samplers.py    each sampler's equations, one function each, and the registry
    tables.py      the [S, K] coefficient table, cached per schedule on the device
    checks.py      sample()'s argument checks
    loop.py        the loop: one model call and one fused step per timestep
    cuda_graph.py  capture and replay of the loop (cuda_graph=True)
    api.py         sample()
"""

from d2nwg.sampling.api import sample
from d2nwg.sampling.samplers import REGISTRY, SAMPLERS, Sampler, prediction_coefficients, register
from d2nwg.sampling.tables import build_table
from d2nwg.sampling.timesteps import default_timesteps
from d2nwg.schedule import PREDICTION_TYPES

__all__ = [
    "sample",
    "SAMPLERS",
    "PREDICTION_TYPES",
    "default_timesteps",
    "build_table",
    "REGISTRY",
    "Sampler",
    "register",
    "prediction_coefficients",
]
