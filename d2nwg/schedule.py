"""Noise schedules of discrete-time diffusion (DDPM-style, timesteps 0 .. T-1).

The forward process is ``x_t = alpha_t * x_0 + sigma_t * eps`` with
``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])``. Every
table is computed in float64 (the samplers derive their per-step coefficients from these, and
float32 cumulative products lose the tail of a 1000-step schedule):

    betas            [T]  beta_t, each in the open interval (0, 1)
    alphas_cumprod   [T]  alpha_bar_t = prod_{s <= t} (1 - beta_s)
    alphas, sigmas_t [T]  alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)
    log_snr          [T]  lambda_t = log(alpha_bar_t / (1 - alpha_bar_t))
                          (twice DPM-Solver's lambda)
    sigmas           [T]  k-diffusion's sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)

A denoiser predicts one of ``PREDICTION_TYPES`` (the names the samplers and the training loss
share): ``"epsilon"`` (the noise), ``"v"`` (Salimans & Ho 2022: ``alpha_t eps - sigma_t x_0``)
or ``"sample"`` (x_0 itself). :meth:`NoiseSchedule.add_noise` and
:meth:`NoiseSchedule.target` give the training pair for each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from d2nwg.errors import ConfigError, DTypeError, NonFiniteError, ShapeError

PREDICTION_TYPES = ("epsilon", "v", "sample")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"unknown prediction_type {prediction_type!r}; choose from {PREDICTION_TYPES}"
        )
    return prediction_type


class NoiseSchedule:
    """A discrete noise schedule of ``T`` timesteps with float64 tables.

    Build one with :meth:`linear`, :meth:`scaled_linear`, :meth:`cosine` or
    :meth:`from_betas`; move its tables with :meth:`to`.
    """

    def __init__(self, betas: torch.Tensor, *, name: str = "custom") -> None:
        _check_betas(betas)
        self.name = name
        self.betas = betas.detach().to(torch.float64).clone()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.alphas = self.alphas_cumprod.sqrt()
        self.sigmas_t = (1.0 - self.alphas_cumprod).sqrt()
        self.log_snr = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def linear(
        cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
    ) -> NoiseSchedule:
        """Ho et al. (2020): betas linear from ``beta_start`` to ``beta_end``."""
        _check_T(T)
        _check_beta_range(beta_start, beta_end)
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(betas, name=f"linear(T={T}, beta_start={beta_start}, beta_end={beta_end})")

    @classmethod
    def scaled_linear(
        cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        """Latent diffusion (Stable Diffusion): sqrt(beta) linear, then squared."""
        _check_T(T)
        _check_beta_range(beta_start, beta_end)
        betas = (
            torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2
        )
        return cls(
            betas, name=f"scaled_linear(T={T}, beta_start={beta_start}, beta_end={beta_end})"
        )

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0) with
        f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2;
        beta_t = 1 - alpha_bar(t+1) / alpha_bar(t),
        clipped to ``max_beta``."""
        _check_T(T)
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
            raise ConfigError(f"s must be a finite number >= 0, got {s!r}")
        if (
            isinstance(max_beta, bool)
            or not isinstance(max_beta, (int, float))
            or not 0 < max_beta < 1
        ):
            raise ConfigError(f"max_beta must lie in (0, 1), got {max_beta!r}")
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(min=1e-12, max=max_beta)
        return cls(betas, name=f"cosine(T={T}, s={s})")

    @classmethod
    def from_betas(cls, betas: torch.Tensor | Sequence[float]) -> NoiseSchedule:
        """A schedule from explicit betas (1-D, each in the open interval (0, 1))."""
        if not isinstance(betas, torch.Tensor):
            try:
                betas = torch.tensor(list(betas), dtype=torch.float64)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"betas must be a 1-D sequence of floats ({exc})") from None
        return cls(betas, name=f"from_betas(T={betas.numel()})")

    # ---- properties -----------------------------------------------------------------------
    @property
    def T(self) -> int:
        """Number of training timesteps."""
        return self.betas.numel()

    num_timesteps = T

    def __len__(self) -> int:
        return self.T

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """This schedule with its (float64) tables on ``device``."""
        new = object.__new__(NoiseSchedule)
        new.name = self.name
        for key in ("betas", "alphas_cumprod", "alphas", "sigmas_t", "log_snr", "sigmas"):
            setattr(new, key, getattr(self, key).to(device))
        return new

    def __repr__(self) -> str:
        return f"NoiseSchedule.{self.name}"

    # ---- forward process and training targets --------------------------------------------
    def _coef(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` shaped ``[B, 1, ...]`` to broadcast against ``like [B, ...]``."""
        c = table.to(t.device)[t].to(like.dtype)
        return c.reshape(c.shape + (1,) * (like.dim() - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha_t x_0 + sigma_t eps`` (Ho et al. 2020, eq. 4) for ``x0 [B, ...]``,
        ``t [B]``."""
        return self._coef(self.alphas, t, x0) * x0 + self._coef(self.sigmas_t, t, x0) * noise

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
    ) -> torch.Tensor:
        """What a model of ``prediction_type`` should output for ``add_noise(x0, noise, t)``."""
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        return self._coef(self.alphas, t, x0) * noise - self._coef(self.sigmas_t, t, x0) * x0


# Longest schedule: six float64 tables of T entries (48 MB here); real ones have 1000-4000.
MAX_TIMESTEPS = 2**20


def _check_T(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_TIMESTEPS:
        raise ConfigError(
            f"T (number of timesteps) must be an int in [1, {MAX_TIMESTEPS}], got {T!r:.60}"
        )


def _check_beta_range(beta_start, beta_end) -> None:
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v < 1):
            raise ConfigError(f"{name} must lie in the open interval (0, 1), got {v!r}")


def _check_betas(betas) -> None:
    if not isinstance(betas, torch.Tensor):
        raise ConfigError(f"betas must be a tensor, got {type(betas).__name__}")
    if not betas.is_floating_point():
        raise DTypeError(f"betas must be a floating-point tensor, got {betas.dtype}")
    if betas.dim() != 1 or betas.numel() == 0:
        raise ShapeError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if betas.numel() > MAX_TIMESTEPS:
        raise ConfigError(f"{betas.numel()} betas, more than MAX_TIMESTEPS = {MAX_TIMESTEPS}")
    if betas.layout != torch.strided or betas.device.type == "meta":
        raise ConfigError(
            f"betas must be a dense tensor with values, got {betas.layout} on {betas.device}"
        )
    b = betas.detach().double()
    if not bool(torch.isfinite(b).all()):
        raise NonFiniteError("betas hold NaN or Inf")
    if not bool(((b > 0) & (b < 1)).all()):
        raise ConfigError(
            f"betas must lie in the open interval (0, 1); got min {b.min().item():.3g}, "
            f"max {b.max().item():.3g}"
        )
