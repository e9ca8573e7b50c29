"""Per-layer normalization: zoo statistics (a streaming fit) and the (shift, scale) they give.

:func:`fit_moments` reads a zoo one model at a time and merges each layer's moments in
float64 (Chan et al.'s parallel rule), so the zoo need not fit in memory; :func:`normalization`
turns a layer's mean and std into the exact-friendly (shift, scale) its tokens are made with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from d2nwg.errors import ConfigError, DTypeError, NonFiniteError, ShapeError

CENTER_THRESHOLD = 0.5  # center a layer when |mean| >= this * std


def normalization(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (shift, scale) each layer is normalized with, from its zoo mean and std.

    Chosen so that round trips stay exact where a float32 token can hold the weight:
    - scale is std rounded to a power of two, so dividing by it is exact;
    - a layer is centered only where its mean matters (|mean| >= std / 2, e.g. norm weights
      around 1); elsewhere shift = 0 and x -> x / scale -> x is exact in every dtype;
    - shift keeps 8 significant bits (bfloat16's), so x - shift is exact for 16-bit weights
      within 2^15 of it in magnitude, and a zero weight comes back as exactly zero.
    Tokens still have per-layer mean ~0 and std in [0.7, 1.4].
    """
    scale = torch.exp2(torch.round(torch.log2(std)))
    centered = mean.abs() >= CENTER_THRESHOLD * std
    shift = torch.where(centered, mean.to(torch.bfloat16).double(), torch.zeros_like(mean))
    return shift, scale


def check_stat(value, name: str, S: int) -> torch.Tensor:
    """Per-layer mean or std: a finite floating tensor [S], as float64 on the CPU."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise DTypeError(f"{name} must be a dense tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise DTypeError(f"{name} has dtype {value.dtype}; expected a floating dtype")
    if tuple(value.shape) != (S,):
        raise ShapeError(
            f"{name} must have shape [{S}] (one entry per layer), got {tuple(value.shape)}"
        )
    value = value.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return value


def statistics(
    mean: torch.Tensor | None, std: torch.Tensor | None, S: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (mean, std) of S layers; None gives the identity (0, 1). std must be > 0."""
    mean = torch.zeros(S, dtype=torch.float64) if mean is None else check_stat(mean, "mean", S)
    std = torch.ones(S, dtype=torch.float64) if std is None else check_stat(std, "std", S)
    if not bool((std > 0).all()):
        raise ConfigError("std must be positive (fit() gives constant layers std 1)")
    return mean, std


def fit_moments(
    models: Iterable[Sequence[torch.Tensor]], names: Sequence[str], allow_nonfinite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (mean, std) in float64 over ``models``, each the S tensors of one model in
    layout order, read once and one at a time. Constant layers get std 1 (only shifted)."""
    S = len(names)
    count = torch.zeros(S, dtype=torch.float64)
    mean = torch.zeros(S, dtype=torch.float64)
    m2 = torch.zeros(S, dtype=torch.float64)
    seen = 0
    for n, tensors in enumerate(models):
        for s, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            var_b, mean_b = torch.var_mean(t.detach().double(), correction=0)
            mean_b, m2_b, n_b = float(mean_b), float(var_b) * t.numel(), float(t.numel())
            if not (math.isfinite(mean_b) and math.isfinite(m2_b)) and not allow_nonfinite:
                raise NonFiniteError(
                    f"state dict {n}[{names[s]!r}] holds NaN or "
                    f"Inf (pass allow_nonfinite=True to allow it)"
                )
            n_a = float(count[s])
            delta = mean_b - float(mean[s])
            total = n_a + n_b
            mean[s] += delta * n_b / total
            m2[s] += m2_b + delta * delta * n_a * n_b / total
            count[s] = total
        seen += 1
    if seen == 0:
        raise ConfigError("fit() needs at least one state dict")
    std = torch.sqrt(m2 / count.clamp(min=1))
    # Constant layers (e.g. LayerNorm weights that are all ones) are only shifted.
    std = torch.where((std > 0) & torch.isfinite(std), std, torch.ones_like(std))
    return torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean)), std
