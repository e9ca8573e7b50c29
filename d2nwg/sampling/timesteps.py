"""Which training timesteps a sampler visits.

By default ``steps`` timesteps are spaced evenly with "trailing" spacing (Lin et al. 2024,
"Common diffusion noise schedules and sample steps are flawed", table 2):
``t_i = round(T - i * T / steps) - 1`` for ``i = 0 .. steps - 1``: descending and distinct, the
first is always T - 1, the last ``round(T / steps) - 1`` (0 when ``steps == T``, which visits
every timestep). Unlike ``linspace(T - 1, 0, steps)`` this spends no step on the tiny jump
from t = 0 to sigma = 0, which also keeps DPM-Solver++'s step-size ratios r moderate. An
explicit descending ``timesteps`` sequence overrides ``steps``.
"""

from __future__ import annotations

import torch

from d2nwg.errors import ConfigError


def default_timesteps(T: int, steps: int) -> list[int]:
    """Trailing spacing ``round(T - i * T / steps) - 1``: descending, distinct for
    ``1 <= steps <= T``, first T - 1 (see the module docstring)."""
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def resolve_timesteps(T: int, steps, timesteps) -> list[int]:
    """The checked timesteps of a run: ``timesteps`` when given, else the default spacing."""
    if timesteps is None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ConfigError(f"steps must be an int, got {steps!r}")
        if not 1 <= steps <= T:
            raise ConfigError(f"steps must lie in [1, T={T}], got {steps}")
        return default_timesteps(T, steps)
    if isinstance(timesteps, torch.Tensor):
        if timesteps.dim() != 1 or timesteps.is_floating_point() or timesteps.is_complex():
            raise ConfigError(
                f"timesteps must be a 1-D integer sequence, got a tensor of shape "
                f"{tuple(timesteps.shape)} and dtype {timesteps.dtype}"
            )
        ts = [int(v) for v in timesteps.tolist()]
    else:
        try:
            ts = list(timesteps)
        except TypeError:
            raise ConfigError(f"timesteps must be a sequence of ints, got {timesteps!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ts):
            raise ConfigError(f"timesteps must be ints, got {ts!r}")
    if not ts:
        raise ConfigError("timesteps is empty")
    if any(not 0 <= v < T for v in ts):
        raise ConfigError(f"timesteps must lie in [0, T-1={T - 1}], got {ts!r}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ConfigError(f"timesteps must be strictly descending, got {ts!r}")
    return ts
