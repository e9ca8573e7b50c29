"""Checks of :func:`d2nwg.sample`'s arguments: every bad input is a :class:`D2NWGError`
naming the argument, raised before any work is done."""

from __future__ import annotations

import math
from typing import Any

import torch

from d2nwg.errors import ConfigError, DeviceError, DTypeError, ShapeError
from d2nwg.sampling.samplers import REGISTRY, SAMPLERS
from d2nwg.schedule import PREDICTION_TYPES, NoiseSchedule

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_arguments(model, x_T, schedule, sampler, prediction_type, eta) -> None:
    """The model, the start, the schedule and the sampler's options."""
    if not callable(model):
        raise ConfigError(
            f"model must be callable as model(x_t, t, cond), got {type(model).__name__}"
        )
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1 or x_T.shape[0] == 0:
        raise ShapeError(
            f"x_T must be a tensor [B, ...] with B >= 1, got "
            f"{getattr(x_T, 'shape', type(x_T).__name__)}"
        )
    if x_T.dtype not in X_DTYPES:
        raise DTypeError(
            f"x_T has dtype {x_T.dtype}; expected float32, float16, bfloat16 or float64"
        )
    if not isinstance(schedule, NoiseSchedule):
        raise ConfigError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"unknown prediction_type {prediction_type!r}; choose from {PREDICTION_TYPES}"
        )
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0 <= eta < math.inf):
        raise ConfigError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta != 0 and not REGISTRY[sampler].uses_eta:
        takers = [name for name, s in REGISTRY.items() if s.uses_eta]
        which = " or ".join(f"sampler={name!r}" for name in takers)
        raise ConfigError(f"eta={eta} applies to {which} only (got sampler={sampler!r})")


def check_generator(generator, B: int) -> None:
    """None, one generator, or a list of one per sample."""
    if generator is not None and not isinstance(generator, torch.Generator):
        if not isinstance(generator, (list, tuple)) or not all(
            isinstance(g, torch.Generator) for g in generator
        ):
            raise ConfigError("generator must be a torch.Generator or a list of one per sample")
        if len(generator) != B:
            raise ConfigError(f"generator lists {len(generator)} generators for {B} samples")


def check_cond(cond, uncond, guidance_scale, B: int, device: torch.device) -> tuple[Any, bool]:
    """The model's cond argument for each step, and whether guidance is on."""
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
    ):
        raise ConfigError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale == 1.0:
        return cond, False
    if uncond is None:
        raise ConfigError(
            f"guidance_scale={guidance_scale} (classifier-free guidance) needs "
            "uncond, the unconditional input of the model; it is None"
        )
    if cond is None:
        raise ConfigError("uncond is given for classifier-free guidance but cond is None")
    if hasattr(cond, "pack") and hasattr(uncond, "pack"):
        # d2nwg.Condition objects (e.g. den.null_condition(1) as uncond): pack both to one
        # tensor shape so that they batch into a single model call; the denoiser unpacks.
        K = max(cond.tokens.shape[1], uncond.tokens.shape[1])
        cond, uncond = cond.pack(K), uncond.pack(K)
    for name, c in (("cond", cond), ("uncond", uncond)):
        if not isinstance(c, torch.Tensor):
            raise ShapeError(
                f"{name} must be a tensor for classifier-free guidance, got {type(c).__name__}"
            )
        if c.dim() == 0:
            raise ShapeError(f"{name} must have a batch dimension, got a 0-d tensor")
        if c.device != device:
            raise DeviceError(f"{name} is on {c.device}, x_T on {device}")
    if cond.shape[0] != B:
        raise ShapeError(f"cond has batch size {cond.shape[0]}, x_T has {B}")
    if uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, B):
        raise ShapeError(
            f"uncond has shape {tuple(uncond.shape)}; expected "
            f"{(B,) + tuple(cond.shape[1:])} or {(1,) + tuple(cond.shape[1:])}"
        )
    if uncond.dtype != cond.dtype:
        raise DTypeError(f"uncond has dtype {uncond.dtype}, cond has {cond.dtype}")
    return torch.cat([cond, uncond.expand_as(cond)]), True
