"""The fused step's coefficient tables: built once in float64, cached per schedule on device.

A run of ``S`` steps reads row ``k`` of a ``[S, K]`` table (columns named in
:mod:`d2nwg.ops.sampler_step_op`) at a device-side step index, so a captured CUDA graph replays
with the right coefficients. :func:`device_tables` caches everything a run needs on its
device, per schedule (entries die with the schedule), so repeated runs pay neither the
float64 arithmetic nor the host-to-device copies.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch

from d2nwg.ops.sampler_step_op import CP, CP2, CZ, G, K
from d2nwg.sampling.samplers import REGISTRY, prediction_coefficients
from d2nwg.schedule import NoiseSchedule


def build_table(
    schedule: NoiseSchedule,
    ts: Sequence[int],
    sampler: str,
    prediction_type: str,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The float64 ``[S, K]`` coefficient table of the fused step (CPU)."""
    abar = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    a_t = abar[list(ts)]
    a_prev = torch.cat([abar[list(ts[1:])], torch.ones(1, dtype=torch.float64)])
    table = torch.zeros(len(ts), K, dtype=torch.float64)
    table[:, G] = guidance_scale
    for col, values in prediction_coefficients(a_t, prediction_type).items():
        table[:, col] = values
    for col, values in REGISTRY[sampler].coefficients(a_t, a_prev, eta).items():
        table[:, col] = values
    return table


class DeviceTables(NamedTuple):
    table: torch.Tensor  # [S, K] float32 (float64 for float64 samples)
    t_table: torch.Tensor  # [S, rows] int64: the model's t at each step
    step_idx: torch.Tensor  # [S] int64: arange (the device-side step index)
    noise_steps: tuple[bool, ...]  # whether step k adds noise
    use_prev: bool  # whether the run keeps the previous x0 (multistep samplers)
    use_prev2: bool  # whether it keeps the one before too (DPM-Solver++(3M), UniPC)


CACHE_SIZE = 32  # entries per schedule
_CACHE: weakref.WeakKeyDictionary[NoiseSchedule, dict[tuple, DeviceTables]] = (
    weakref.WeakKeyDictionary()
)


def device_tables(
    schedule: NoiseSchedule,
    ts: list[int],
    sampler: str,
    prediction_type: str,
    eta: float,
    guidance_scale: float,
    dtype: torch.dtype,
    rows: int,
    device: torch.device,
) -> DeviceTables:
    """The tables of one run on ``device``, cached per schedule."""
    cache = _CACHE.setdefault(schedule, {})
    key = (tuple(ts), sampler, prediction_type, eta, guidance_scale, dtype, rows, device)
    hit = cache.get(key)
    if hit is not None:
        return hit
    table64 = build_table(schedule, ts, sampler, prediction_type, eta, guidance_scale)
    S = len(ts)
    use_prev2 = bool((table64[:, CP2] != 0).any())
    entry = DeviceTables(
        table64.to(device=device, dtype=dtype),
        torch.tensor(ts, dtype=torch.int64).view(S, 1).expand(S, rows).contiguous().to(device),
        torch.arange(S, dtype=torch.int64, device=device),
        tuple(bool(v != 0) for v in table64[:, CZ].tolist()),
        use_prev2 or bool((table64[:, CP] != 0).any()),  # prev2 is fed from prev
        use_prev2,
    )
    if len(cache) >= CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = entry
    return entry
