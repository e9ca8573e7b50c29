"""Where the generator runs: device names, and the precision training and sampling share."""

from __future__ import annotations

import torch

from d2nwg.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a
    ConfigError saying why anything else cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: d2nwg runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is visible")
    return device


def bf16_autocast(on_cuda: bool, cache_enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA, nothing elsewhere: the denoiser's precision in training and in
    sampling alike (the sampler's state stays in its own dtype). Sampling turns autocast's
    weight cache off, which CUDA-graph capture does not allow."""
    return torch.autocast("cuda", torch.bfloat16, enabled=on_cuda, cache_enabled=cache_enabled)
