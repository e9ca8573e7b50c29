"""The samplers' equations, one function each, and the one registry of samplers.

Every sampler is one fused step per timestep (:mod:`d2nwg.ops.sampler_step_op`):

    x_next = CX * x_t + C0 * x0_hat + CE * eps_hat [+ CP * x0_hat_prev] [+ CZ * z]

A sampler is a function ``(abar_t, abar_prev, eta) -> {column: [S] float64}`` giving those
columns (the names of :mod:`d2nwg.ops.sampler_step_op`; a column it leaves out is zero) for its
``S`` steps, where step ``k`` goes from timestep ``ts[k]`` (``abar_t[k]``) to ``ts[k + 1]``
(``abar_prev[k]``), and the last step to ``abar_prev = 1`` (sigma = 0). Adding one that fits
this formula (Euler-ancestral, say) is one function decorated with :func:`register`.

The prediction type (epsilon, v, sample) decides how the step gets x0_hat and eps_hat from
the model output (columns AX, AO, EX, EO): :data:`PREDICTIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from d2nwg.ops.sampler_step_op import AO, AX, C0, CE, CP, CX, CZ, EO, EX
from d2nwg.schedule import PREDICTION_TYPES

Columns = dict[int, torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its update columns and whether it takes DDIM's ``eta``."""

    name: str
    coefficients: Callable[[torch.Tensor, torch.Tensor, float], Columns]
    uses_eta: bool = False


REGISTRY: dict[str, Sampler] = {}


def register(name: str, *, uses_eta: bool = False):
    """Decorator: register ``fn(abar_t, abar_prev, eta) -> columns`` as sampler ``name``."""

    def add(fn: Callable[[torch.Tensor, torch.Tensor, float], Columns]):
        REGISTRY[name] = Sampler(name, fn, uses_eta)
        return fn

    return add


@register("ddpm")
def ddpm(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float = 0.0) -> Columns:
    """Ancestral DDPM (Ho et al. 2020), on the full or a respaced set of timesteps.

    With the respaced beta_t = 1 - abar_t / abar_prev (Nichol & Dhariwal 2021, sec. 4), the
    posterior q(x_prev | x_t, x_0) of Ho et al. eq. 6-7 gives
        x_prev = sqrt(abar_prev) beta_t / (1 - abar_t) * x0
               + sqrt(1 - beta_t) (1 - abar_prev) / (1 - abar_t) * x_t
               + sqrt(beta_tilde_t) * z,      beta_tilde_t = (1 - abar_prev) / (1 - abar_t) beta_t.
    """
    beta = 1 - a_t / a_prev
    return {
        CX: (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t),
        C0: a_prev.sqrt() * beta / (1 - a_t),
        CZ: ((1 - a_prev) / (1 - a_t) * beta).clamp(min=0).sqrt(),  # sqrt(beta_tilde)
    }


@register("ddim", uses_eta=True)
def ddim(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float = 0.0) -> Columns:
    """DDIM (Song et al. 2021), eq. 12 with sigma from eq. 16:
        x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma_t^2) * eps + sigma_t * z,
        sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
    eta = 0 is deterministic; eta = 1 is DDPM's ancestral sampler.
    """
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    return {
        C0: a_prev.sqrt(),
        CE: (1 - a_prev - sigma**2).clamp(min=0).sqrt(),  # "direction pointing to x_t"
        CZ: sigma,
    }


@register("dpmpp_2m")
def dpmpp_2m(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float = 0.0) -> Columns:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h = lambda_prev - lambda_t (eq. 9 / Alg. 2):
        x_prev = (sigma_prev / sigma_t) * x_t - alpha_prev * (exp(-h) - 1) * D,
        D = x0                                              (first order: first and last step)
        D = (1 + 1 / (2r)) * x0 - 1 / (2r) * x0_before,     r = h_before / h   (second order),
    where x0_before is the previous step's data prediction (the kernel's prev_x0 buffer). The
    last step ends at sigma = 0 (lambda = +inf), where the update is exactly x_prev = x0.
    """
    S = len(a_t)
    at, ap = a_t.tolist(), a_prev.tolist()  # python floats: S is small
    cx, c0, cp = [0.0] * S, [0.0] * S, [0.0] * S
    h_before = None
    for k in range(S):
        if k == S - 1:  # to sigma = 0: x_prev = x0
            c0[k] = 1.0
            break
        lam_t = 0.5 * (math.log(at[k]) - math.log1p(-at[k]))
        lam_prev = 0.5 * (math.log(ap[k]) - math.log1p(-ap[k]))
        h = lam_prev - lam_t
        sig_t, sig_prev = math.sqrt(1 - at[k]), math.sqrt(1 - ap[k])
        phi = -math.sqrt(ap[k]) * math.expm1(-h)  # -alpha_prev * (exp(-h) - 1)
        cx[k] = sig_prev / sig_t
        if h_before is None:  # first step: first order
            c0[k] = phi
        else:
            r = h_before / h
            c0[k] = phi * (1 + 1 / (2 * r))
            cp[k] = -phi / (2 * r)
        h_before = h
    f64 = torch.float64
    return {
        CX: torch.tensor(cx, dtype=f64),
        C0: torch.tensor(c0, dtype=f64),
        CP: torch.tensor(cp, dtype=f64),
    }


SAMPLERS = tuple(REGISTRY)


# ----------------------------------------------------------------------------------------
# Prediction types: x0 = AX x + AO o and eps = EX x + EO o, with x_t = alpha x0 + sigma eps
# and o the model output.
# ----------------------------------------------------------------------------------------
def _epsilon(al: torch.Tensor, sg: torch.Tensor) -> Columns:
    """x0 = (x - sigma o) / alpha, eps = o."""
    return {AX: 1 / al, AO: -sg / al, EX: torch.zeros_like(al), EO: torch.ones_like(al)}


def _v(al: torch.Tensor, sg: torch.Tensor) -> Columns:
    """x0 = alpha x - sigma o, eps = sigma x + alpha o (Salimans & Ho 2022)."""
    return {AX: al, AO: -sg, EX: sg, EO: al}


def _sample(al: torch.Tensor, sg: torch.Tensor) -> Columns:
    """x0 = o, eps = (x - alpha o) / sigma."""
    return {AX: torch.zeros_like(al), AO: torch.ones_like(al), EX: 1 / sg, EO: -al / sg}


PREDICTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], Columns]] = {
    "epsilon": _epsilon,
    "v": _v,
    "sample": _sample,
}
assert tuple(PREDICTIONS) == PREDICTION_TYPES


def prediction_coefficients(a_t: torch.Tensor, prediction_type: str) -> Columns:
    """Columns AX, AO, EX, EO for float64 ``abar_t`` [S]."""
    return PREDICTIONS[prediction_type](a_t.sqrt(), (1 - a_t).sqrt())
