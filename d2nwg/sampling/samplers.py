"""The samplers' equations, one function each, and the one registry of samplers.

Every sampler is one fused step per timestep (:mod:`d2nwg.ops.sampler_step_op`):

    x_next = CX * x_t + C0 * x0_hat + CE * eps_hat [+ CP * x0_hat_prev] [+ CP2 * x0_hat_prev2]
             [+ CZ * z]

where x0_hat_prev and x0_hat_prev2 are the data predictions of the one and two steps before
(multistep samplers: DPM-Solver++(2M) reads one, DPM-Solver++(3M) and UniPC two).

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

from d2nwg.ops.sampler_step_op import AO, AX, C0, CE, CP, CP2, CX, CZ, EO, EX
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


def _half_log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2 (DPM-Solver's lambda)."""
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def _f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@register("dpmpp_3m")
def dpmpp_3m(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float = 0.0) -> Columns:
    """DPM-Solver++(3M): the third-order multistep DPM-Solver++ (Lu et al. 2022,
    "DPM-Solver++", arXiv:2211.01095; the third-order multistep update of its reference code
    and of diffusers' DPMSolverMultistepScheduler(solver_order=3)), data prediction.

    With alpha, sigma, lambda and h as in :func:`dpmpp_2m`, m0, m1, m2 the data predictions of
    this step and the two before, h_0 and h_1 the two step sizes before this one (in lambda),
    r0 = h_0 / h and r1 = h_1 / h:
        D1_0 = (m0 - m1) / r0,   D1_1 = (m1 - m2) / r1,
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1),   D2 = (D1_0 - D1_1) / (r0 + r1),
        x_prev = (sigma_prev / sigma_t) * x_t - alpha_prev * (exp(-h) - 1) * m0
               + alpha_prev * ((exp(-h) - 1) / h + 1) * D1
               - alpha_prev * ((exp(-h) - 1 + h) / h^2 - 1/2) * D2,
    the exponential integrator x_prev = (sigma_prev / sigma_t) x_t
    + sigma_prev * int_lambda_t^lambda_prev e^lambda x0(lambda) dlambda with x0 expanded to
    second order in lambda (its derivatives estimated from the last three predictions).
    Orders, as diffusers: step 0 first order (DDIM), step 1 second order (the 2M update with
    D1 = (m0 - m1) / r0: x_prev = ... - alpha_prev (exp(-h) - 1) (m0 + D1 / 2)), then third;
    the last step (to sigma = 0) is first order, i.e. exactly x_prev = m0, and with fewer than
    15 steps the step before it is second order ("lower_order_final").
    """
    S = len(a_t)
    at, ap = a_t.tolist(), a_prev.tolist()
    cx, c0, cp, cp2 = ([0.0] * S for _ in range(4))
    lam = [_half_log_snr(a) for a in at]  # lambda at each step's timestep
    for k in range(S):
        if k == S - 1:  # to sigma = 0: x_prev = m0
            c0[k] = 1.0
            break
        order = 1 if k == 0 else 2 if k == 1 or (k == S - 2 and S < 15) else 3
        h = _half_log_snr(ap[k]) - lam[k]
        alpha_prev = math.sqrt(ap[k])
        em1 = math.expm1(-h)  # exp(-h) - 1
        cx[k] = math.sqrt(1 - ap[k]) / math.sqrt(1 - at[k])
        phi1 = -alpha_prev * em1  # the weight of m0 (D0)
        if order == 1:
            c0[k] = phi1
            continue
        r0 = (lam[k] - lam[k - 1]) / h
        d1_0 = (1 / r0, -1 / r0, 0.0)  # D1_0 as weights of (m0, m1, m2)
        if order == 2:  # midpoint: D = m0 + D1_0 / 2
            w = [phi1 * (e + 0.5 * d) for e, d in zip((1.0, 0.0, 0.0), d1_0)]
        else:
            r1 = (lam[k - 1] - lam[k - 2]) / h
            d1_1 = (0.0, 1 / r1, -1 / r1)
            diff = [a - b for a, b in zip(d1_0, d1_1)]  # D1_0 - D1_1
            d1 = [a + r0 / (r0 + r1) * b for a, b in zip(d1_0, diff)]
            d2 = [b / (r0 + r1) for b in diff]
            phi2 = alpha_prev * (em1 / h + 1)  # the weight of D1
            phi3 = -alpha_prev * ((em1 + h) / h**2 - 0.5)  # the weight of D2
            w = [phi1 * e + phi2 * a + phi3 * b for e, a, b in zip((1.0, 0.0, 0.0), d1, d2)]
        c0[k], cp[k], cp2[k] = w
    return {CX: _f64(cx), C0: _f64(c0), CP: _f64(cp), CP2: _f64(cp2)}


@register("unipc")
def unipc(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float = 0.0) -> Columns:
    """UniPC-2 with B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, "UniPC: A
    Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", the multistep
    UniP-p predictor and UniC-p corrector for x0 prediction; as diffusers'
    UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True)).

    Notation of :func:`dpmpp_2m`; m_k is the data prediction at step k's timestep t_k, from
    the model output at the *predicted* x_k. With h = lambda_{k+1} - lambda_k,
    B(h) = e^{-h} - 1 (the paper's e^h - 1 at -h, data prediction) and r = (lambda_{k-1} -
    lambda_k) / h:
        UniP-2 (predictor)  x_{k+1} = (sigma_{k+1} / sigma_k) xc_k - alpha_{k+1} (e^{-h} - 1) m_k
                                      - alpha_{k+1} B(h) rho_p D1,
                            D1 = (m_{k-1} - m_k) / r, rho_p = 1/2  (UniP-1 drops the D1 term),
        UniC-p (corrector)  xc_{k+1} = (sigma_{k+1} / sigma_k) xc_k - alpha_{k+1} (e^{-h} - 1) m_k
                                       - alpha_{k+1} B(h) (rho_1 D1 + rho_c (m_{k+1} - m_k)),
    the same update with the new prediction m_{k+1} in it, where (rho_1, rho_c) solves
    [[1, 1], [r, 1]] (rho_1, rho_c) = (g_1, g_2) / B(h) (UniC-2), g_i = i! x phi_{i+1}(x) at
    x = -h (the paper's g_i(h) = i! h phi_{i+1}(h), data prediction), phi_2(x) = (e^x - 1 - x)
    / x^2, phi_3(x) = (phi_2(x) - 1/2) / x; UniC-1 has no D1 term and rho_c = 1/2. The
    corrector's order is the predictor's of the step before.
    Each step corrects x_k (k > 0) with the model output just computed there, then predicts
    x_{k+1} from the corrected xc_k. The predictor is first order at the first step and at
    the last (to sigma = 0, where x_S = m_{S-1} exactly, so no corrector follows it),
    second order in between ("lower_order_final").

    Both updates share the xc_k and m_k terms, so xc_{k+1} = x_{k+1} + (the difference of
    their D1 and m_{k+1} terms): the corrector folds into the next step's coefficients of
    m_{k+1}, m_k and m_{k-1} (columns C0, CP, CP2), and the fused step never stores xc.
    """
    S = len(a_t)
    at, ap = a_t.tolist(), a_prev.tolist()
    cx, c0, cp, cp2 = ([0.0] * S for _ in range(4))
    lam = [_half_log_snr(a) for a in at]  # lambda_k of each step's timestep t_k
    alpha = [math.sqrt(a) for a in at]
    sigma = [math.sqrt(1 - a) for a in at]

    def order(k: int) -> int:  # the predictor's order at step k (the corrector's at k + 1)
        return 1 if k == 0 or k == S - 1 else 2

    for k in range(S):
        if k == S - 1:  # to sigma = 0: x_S = m_{S-1} (the corrected x has weight 0)
            c0[k] = 1.0
            break
        # UniC at t_k: xc_k = x_k + u0 m_k + u1 m_{k-1} + u2 m_{k-2}.
        u0 = u1 = u2 = 0.0
        if k > 0:
            h = lam[k] - lam[k - 1]
            B = math.expm1(-h)  # B(h)
            A = alpha[k] * B
            if order(k - 1) == 1:  # UniC-1: - A (m_k - m_{k-1}) / 2; UniP-1 had no D1
                u0, u1 = -0.5 * A, 0.5 * A
            else:  # UniC-2 minus UniP-2: - A ((rho_1 - 1/2) D1 + rho_c (m_k - m_{k-1}))
                r = (lam[k - 2] - lam[k - 1]) / h
                x = -h
                x_phi_2 = math.expm1(x) / x - 1  # x phi_2(x)
                x_phi_3 = x_phi_2 / x - 0.5  # x phi_3(x)
                g1, g2 = x_phi_2 / B, 2 * x_phi_3 / B
                rho_1 = (g1 - g2) / (1 - r)
                rho_c = g1 - rho_1
                d = (rho_1 - 0.5) / r  # D1 = (m_{k-2} - m_{k-1}) / r
                u0, u1, u2 = -A * rho_c, A * d + A * rho_c, -A * d
        # UniP from xc_k to t_{k+1}.
        h = _half_log_snr(ap[k]) - lam[k]
        alpha_next, ratio = math.sqrt(ap[k]), math.sqrt(1 - ap[k]) / sigma[k]
        em1 = math.expm1(-h)  # e^{-h} - 1 = B(h)
        p0, p1 = -alpha_next * em1, 0.0
        if order(k) == 2:  # - alpha_{k+1} B(h) / 2 * (m_{k-1} - m_k) / r
            r = (lam[k - 1] - lam[k]) / h
            p0, p1 = p0 + alpha_next * em1 * 0.5 / r, -alpha_next * em1 * 0.5 / r
        cx[k] = ratio
        c0[k], cp[k], cp2[k] = ratio * u0 + p0, ratio * u1 + p1, ratio * u2
    return {CX: _f64(cx), C0: _f64(c0), CP: _f64(cp), CP2: _f64(cp2)}


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
