"""Diffusion samplers (DDPM, DDIM, DPM-Solver++(2M)) on the fused step op.

``sample(model, x_T, schedule, sampler=..., steps=...)`` runs the reverse process from
``x_T`` and returns the final sample x_0. Each step is one model call and one fused kernel
(:func:`d2nwg.ops.sampler_step.sampler_step_`): the samplers differ only in the per-step
coefficients, which are computed here once, in float64, into a device table read at a
device-side step index. A sampler's coefficients are written in the x_0 / eps basis

    x_next = CX * x_t + C0 * x0_hat + CE * eps_hat [+ CP * x0_hat_prev] [+ CZ * z]

and the prediction type (epsilon, v, sample) decides how the kernel gets x0_hat and eps_hat
from the model output (columns AX, AO, EX, EO).

Timesteps. By default ``steps`` timesteps are spaced evenly with "trailing" spacing (Lin et
al. 2024, "Common diffusion noise schedules and sample steps are flawed", table 2):
``t_i = round(T - i * T / steps) - 1`` for ``i = 0 .. steps - 1``: descending and distinct, the
first is always T - 1, the last ``round(T / steps) - 1`` (0 when ``steps == T``, which visits
every timestep). Unlike ``linspace(T - 1, 0, steps)`` this spends no step on the tiny jump from
t = 0 to sigma = 0, which also keeps DPM-Solver++'s step-size ratios r moderate. An explicit descending ``timesteps`` sequence overrides
``steps``. After the last timestep every sampler lands on alpha_bar = 1 (sigma = 0): its last
step returns the data prediction (DDIM, DPM-Solver++) or the posterior mean with zero variance
(DDPM).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from d2nwg.backends import select
from d2nwg.errors import ConfigError, DTypeError, ShapeError
from d2nwg.ops.sampler_step import (AO, AX, C0, CE, CP, CX, CZ, EO, EX, G, K,
                                    SAMPLER_STEP_BACKENDS)
from d2nwg.schedule import PREDICTION_TYPES, NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


# ----------------------------------------------------------------------------------------
# Timesteps.
# ----------------------------------------------------------------------------------------
def default_timesteps(T: int, steps: int) -> list[int]:
    """Trailing spacing ``round(T - i * T / steps) - 1``: descending, distinct for
    ``1 <= steps <= T``, first T - 1 (see the module docstring)."""
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def _resolve_timesteps(T: int, steps, timesteps) -> list[int]:
    if timesteps is None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ConfigError(f"steps must be an int, got {steps!r}")
        if not 1 <= steps <= T:
            raise ConfigError(f"steps must lie in [1, T={T}], got {steps}")
        return default_timesteps(T, steps)
    if isinstance(timesteps, torch.Tensor):
        if timesteps.dim() != 1 or timesteps.is_floating_point() or timesteps.is_complex():
            raise ConfigError(f"timesteps must be a 1-D integer sequence, got a tensor of shape "
                              f"{tuple(timesteps.shape)} and dtype {timesteps.dtype}")
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


# ----------------------------------------------------------------------------------------
# Samplers: per-step coefficients in the x0 / eps basis, float64 [S, 5] = (CX, C0, CE, CP, CZ).
# Step k goes from timestep ts[k] ("t") to ts[k + 1] ("prev"), and the last step to
# alpha_bar_prev = 1. abar = alphas_cumprod (float64, CPU).
# ----------------------------------------------------------------------------------------
def _abar_pairs(abar: torch.Tensor, ts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    t = abar[list(ts)]
    prev = torch.cat([abar[list(ts[1:])], torch.ones(1, dtype=torch.float64)])
    return t, prev


def ddpm_coefficients(abar: torch.Tensor, ts: Sequence[int]) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020), on the full or a respaced set of timesteps.

    With the respaced beta_t = 1 - abar_t / abar_prev (Nichol & Dhariwal 2021, sec. 4), the
    posterior q(x_prev | x_t, x_0) of Ho et al. eq. 6-7 gives
        x_prev = sqrt(abar_prev) beta_t / (1 - abar_t) * x0
               + sqrt(1 - beta_t) (1 - abar_prev) / (1 - abar_t) * x_t
               + sqrt(beta_tilde_t) * z,      beta_tilde_t = (1 - abar_prev) / (1 - abar_t) beta_t.
    """
    a_t, a_prev = _abar_pairs(abar, ts)
    beta = 1 - a_t / a_prev
    c = torch.zeros(len(ts), 5, dtype=torch.float64)
    c[:, 0] = (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)          # CX
    c[:, 1] = a_prev.sqrt() * beta / (1 - a_t)                      # C0
    c[:, 4] = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=0).sqrt()  # CZ = sqrt(beta_tilde)
    return c


def ddim_coefficients(abar: torch.Tensor, ts: Sequence[int], eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021), eq. 12 with sigma from eq. 16:
        x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma_t^2) * eps + sigma_t * z,
        sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
    eta = 0 is deterministic; eta = 1 is DDPM's ancestral sampler.
    """
    a_t, a_prev = _abar_pairs(abar, ts)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    c = torch.zeros(len(ts), 5, dtype=torch.float64)
    c[:, 1] = a_prev.sqrt()                                          # C0
    c[:, 2] = (1 - a_prev - sigma**2).clamp(min=0).sqrt()            # CE ("direction to x_t")
    c[:, 4] = sigma                                                  # CZ
    return c


def dpmpp_2m_coefficients(abar: torch.Tensor, ts: Sequence[int]) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h = lambda_prev - lambda_t (eq. 9 / Alg. 2):
        x_prev = (sigma_prev / sigma_t) * x_t - alpha_prev * (exp(-h) - 1) * D,
        D = x0                                              (first order: first and last step)
        D = (1 + 1 / (2r)) * x0 - 1 / (2r) * x0_before,     r = h_before / h   (second order),
    where x0_before is the previous step's data prediction (the kernel's prev_x0 buffer). The
    last step ends at sigma = 0 (lambda = +inf), where the update is exactly x_prev = x0.
    """
    S = len(ts)
    a_t, a_prev = (v.tolist() for v in _abar_pairs(abar, ts))   # python floats: S is small
    c = [[0.0] * 5 for _ in range(S)]
    h_before = None
    for k in range(S):
        if k == S - 1:                                   # to sigma = 0: x_prev = x0
            c[k][1] = 1.0
            break
        lam_t = 0.5 * (math.log(a_t[k]) - math.log1p(-a_t[k]))
        lam_prev = 0.5 * (math.log(a_prev[k]) - math.log1p(-a_prev[k]))
        h = lam_prev - lam_t
        sig_t, sig_prev = math.sqrt(1 - a_t[k]), math.sqrt(1 - a_prev[k])
        phi = -math.sqrt(a_prev[k]) * math.expm1(-h)     # -alpha_prev * (exp(-h) - 1)
        c[k][0] = sig_prev / sig_t                       # CX
        if h_before is None:                             # first step: first order
            c[k][1] = phi
        else:
            r = h_before / h
            c[k][1] = phi * (1 + 1 / (2 * r))            # C0
            c[k][3] = -phi / (2 * r)                     # CP
        h_before = h
    return torch.tensor(c, dtype=torch.float64)


def prediction_coefficients(abar: torch.Tensor, ts: Sequence[int],
                            prediction_type: str) -> torch.Tensor:
    """float64 [S, 4] = (AX, AO, EX, EO): x0 = AX x + AO o, eps = EX x + EO o, with
    x_t = alpha x0 + sigma eps and o the model output:
        epsilon: x0 = (x - sigma o) / alpha,   eps = o
        v:       x0 = alpha x - sigma o,       eps = sigma x + alpha o   (Salimans & Ho 2022)
        sample:  x0 = o,                       eps = (x - alpha o) / sigma
    """
    a_t = abar[list(ts)]
    al, sg = a_t.sqrt(), (1 - a_t).sqrt()
    one, zero = torch.ones_like(al), torch.zeros_like(al)
    if prediction_type == "epsilon":
        cols = (1 / al, -sg / al, zero, one)
    elif prediction_type == "v":
        cols = (al, -sg, sg, al)
    else:
        cols = (zero, one, 1 / sg, -al / sg)
    return torch.stack(cols, dim=1)


SAMPLER_COEFFICIENTS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_coefficients,
    "ddim": ddim_coefficients,
    "dpmpp_2m": dpmpp_2m_coefficients,
}


def build_table(schedule: NoiseSchedule, ts: Sequence[int], sampler: str, prediction_type: str,
                eta: float = 0.0, guidance_scale: float = 1.0) -> torch.Tensor:
    """The float64 [S, K] coefficient table of the fused step (CPU)."""
    abar = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    upd = ddim_coefficients(abar, ts, eta) if sampler == "ddim" else \
        SAMPLER_COEFFICIENTS[sampler](abar, ts)
    pred = prediction_coefficients(abar, ts, prediction_type)
    table = torch.zeros(len(ts), K, dtype=torch.float64)
    table[:, G] = guidance_scale
    table[:, [AX, AO, EX, EO]] = pred
    table[:, [CX, C0, CE, CP, CZ]] = upd
    return table


# ----------------------------------------------------------------------------------------
# The sampling loop.
# ----------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything a run needs, on the sampling device; shared by the eager and graph loops."""

    model: Callable
    shape: tuple[int, ...]          # x_T's shape [B, ...]
    B: int
    N: int
    guided: bool
    table: torch.Tensor             # [S, K] float32/float64
    t_table: torch.Tensor           # [S, B or 2B] int64: the model's t at each step
    step_idx: torch.Tensor          # [S] int64: arange (the device-side step index)
    noise_steps: tuple[bool, ...]   # whether step k adds noise
    use_prev: bool                  # DPM-Solver++(2M): keep the previous x0
    run: Callable                   # the selected backend of the fused step
    draw: Callable[[], torch.Tensor]  # one step's noise [B, N]

    @property
    def S(self) -> int:
        return len(self.noise_steps)


def _check_out(plan: _Plan, out: Any) -> None:
    rows = 2 * plan.B if plan.guided else plan.B
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"model(x_t, t, cond) must return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != (rows,) + plan.shape[1:]:
        raise ShapeError(f"model(x_t, t, cond) returned shape {tuple(out.shape)}, expected "
                         f"{(rows,) + plan.shape[1:]} (the shape of its input x_t)")
    if not out.is_floating_point():
        raise DTypeError(f"model(x_t, t, cond) returned dtype {out.dtype}")


def _loop(plan: _Plan, x: torch.Tensor, prev: torch.Tensor | None, cond_in: Any,
          noise: Callable[[int], torch.Tensor | None]) -> None:
    """S steps in place on x [B, N]: one model call and one fused kernel per step.

    Per step this does only the model call (on a cat of x with itself under guidance) and the
    fused op: the timesteps and step indices are views made once, the state is updated in
    place (so its model-shaped view stays valid).
    """
    model, run, table, guided = plan.model, plan.run, plan.table, plan.guided
    rows, N, dtype = (2 * plan.B if guided else plan.B), plan.N, x.dtype
    x_model = x.view(plan.shape)
    t_views = list(plan.t_table.unbind(0))            # [S] views, made once
    s_views = list(plan.step_idx.unbind(0))
    for k in range(plan.S):
        x_in = torch.cat([x_model, x_model]) if guided else x_model
        out = model(x_in, t_views[k], cond_in)
        _check_out(plan, out)  # every step: a shape that changes later must not pass silently
        out = out.reshape(rows, N)
        if out.dtype != dtype:
            out = out.to(dtype)
        if not out.is_contiguous():
            out = out.contiguous()
        run(x, out, table, s_views[k], noise(k), prev, guided)


def _eager(plan: _Plan, x: torch.Tensor, cond_in: Any) -> torch.Tensor:
    prev = torch.zeros_like(x) if plan.use_prev else None
    _loop(plan, x, prev, cond_in, lambda k: plan.draw() if plan.noise_steps[k] else None)
    return x


# CUDA graphs: one captured loop per (model, shapes, flags), replayed with fresh inputs copied
# into its static buffers. Entries die with the model.
_GRAPHS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_MAX_GRAPHS_PER_MODEL = 8
# stacklevel of a warning in _with_graph_on_device that names the caller of sample():
# _with_graph_on_device <- _with_graph <- sample <- torch.no_grad's wrapper <- caller.
_CALLER = 5


class _Captured:
    def __init__(self, plan: _Plan, x: torch.Tensor, cond_in: Any) -> None:
        self.x_T = x.clone()                                  # static inputs
        self.x = torch.empty_like(x)                          # the state, in place
        self.cond = cond_in.clone() if isinstance(cond_in, torch.Tensor) else cond_in
        self.table = plan.table.clone()
        self.t_table = plan.t_table.clone()
        self.step_idx = plan.step_idx.clone()                 # owned: the graph reads it
        n_noise = sum(plan.noise_steps)
        self.noise = torch.empty((n_noise,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        self.prev = torch.zeros_like(x) if plan.use_prev else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.state: tuple = ()                                # _state_signature at capture

    def plan_view(self, plan: _Plan) -> _Plan:
        return _Plan(**{**plan.__dict__, "table": self.table, "t_table": self.t_table,
                        "step_idx": self.step_idx})

    def body(self, plan: _Plan) -> None:
        self.x.copy_(self.x_T)
        if self.prev is not None:
            self.prev.zero_()
        slot = {k: i for i, k in enumerate(k for k in range(plan.S) if plan.noise_steps[k])}
        _loop(self.plan_view(plan), self.x, self.prev, self.cond,
              lambda k: self.noise[slot[k]] if k in slot else None)

    def load(self, plan: _Plan, x: torch.Tensor, cond_in: Any) -> None:
        self.x_T.copy_(x)
        if isinstance(self.cond, torch.Tensor):
            self.cond.copy_(cond_in)
        self.table.copy_(plan.table)
        self.t_table.copy_(plan.t_table)
        for i in range(self.noise.shape[0]):     # same draws, same order as the eager loop
            self.noise[i].copy_(plan.draw())


def _graph_key(plan: _Plan, x: torch.Tensor, cond_in: Any) -> tuple:
    cond_sig = (tuple(cond_in.shape), cond_in.dtype) if isinstance(cond_in, torch.Tensor) \
        else ("object", id(cond_in))
    return (tuple(plan.shape), x.dtype, x.device, plan.guided, plan.noise_steps, plan.use_prev,
            plan.table.dtype, plan.run, cond_sig, _autocast_state())


def _autocast_state() -> tuple:
    """CUDA autocast as the capture sees it: a graph captured under autocast runs the model in
    its lower precision, one captured without does not."""
    if torch.is_autocast_enabled("cuda"):
        return ("autocast", torch.get_autocast_dtype("cuda"))
    return ()


def _no_autocast_cache():
    """Autocast without its weight cache (PyTorch's rule for capture): cached casts made
    during the warm-up would be freed when the caller's autocast region ends, and the graph
    would replay reading them."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _state_signature(model: Any) -> tuple:
    """Where an ``nn.Module`` model's parameters and buffers live: a captured graph reads them
    at these addresses, so ``model.to(...)`` or ``p.data = ...`` after capture needs a new
    capture. (A plain callable that closes over a module cannot be checked.)"""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape))
                 for t in itertools.chain(model.parameters(), model.buffers()))


def _with_graph(plan: _Plan, x: torch.Tensor, cond_in: Any) -> torch.Tensor:
    with torch.cuda.device(x.device):  # capture, pool and replay on x's device
        return _with_graph_on_device(plan, x, cond_in)


def _with_graph_on_device(plan: _Plan, x: torch.Tensor, cond_in: Any) -> torch.Tensor:
    try:
        per_model = _GRAPHS.setdefault(plan.model, {})
    except TypeError:  # not weak-referenceable: capture for this call only
        per_model = {}
    key = _graph_key(plan, x, cond_in)
    entry = per_model.get(key)
    if isinstance(entry, _Captured) and entry.state != _state_signature(plan.model):
        del per_model[key]   # parameters or buffers were reallocated since the capture
        entry = None
    if entry == "eager":
        return _eager(plan, x, cond_in)
    if entry is not None:
        entry.load(plan, x, cond_in)
        entry.graph.replay()
        return entry.x.clone()

    noise_bytes = sum(plan.noise_steps) * x.numel() * x.element_size()
    free = torch.cuda.mem_get_info(x.device)[0]
    if noise_bytes > free // 4:
        warnings.warn(f"cuda_graph=True: the {sum(plan.noise_steps)} steps' noise ({noise_bytes / 2**30:.2f} "
                      f"GiB) would not fit beside the graph; running eagerly", RuntimeWarning,
                      stacklevel=_CALLER)
        per_model[key] = "eager"
        return _eager(plan, x, cond_in)
    cap = _Captured(plan, x, cond_in)
    cap.load(plan, x, cond_in)
    # Warm-up on a side stream (lazy initialization, cuBLAS workspaces): an eager run whose
    # result is this call's answer. Then capture the whole loop, model calls included, on that
    # same stream: it is on x's device (torch.cuda.graph's own default stream is created once,
    # on whichever device was current then).
    main = torch.cuda.current_stream(x.device)
    side = torch.cuda.Stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side), _no_autocast_cache():
        cap.body(plan)
    main.wait_stream(side)
    result = cap.x.clone()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side), _no_autocast_cache():
            cap.body(plan)
    except Exception as exc:  # noqa: BLE001 - any failure: fall back, say why, once
        # When capture_end raises (an invalidated capture: a host sync, .item(), ...),
        # torch.cuda.graph.__exit__ skips restoring the stream: the capture stream would stay
        # current for everything the caller does next.
        torch.cuda.set_stream(main)
        try:
            torch.cuda.synchronize(x.device)
        except RuntimeError:
            pass
        warnings.warn(f"cuda_graph=True: could not capture the sampling loop "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      f"running eagerly", RuntimeWarning, stacklevel=_CALLER)
        per_model[key] = "eager"
        return result
    cap.graph, cap.state = graph, _state_signature(plan.model)   # as the graph reads them
    if len(per_model) >= _MAX_GRAPHS_PER_MODEL:
        per_model.pop(next(iter(per_model)))
    per_model[key] = cap
    return result


_TABLE_CACHE_SIZE = 32


def _device_tables(schedule: NoiseSchedule, ts: list[int], sampler: str, prediction_type: str,
                   eta: float, guidance_scale: float, dtype: torch.dtype, rows: int,
                   device: torch.device):
    """(table [S, K], t_table [S, rows], step_idx [S], noise_steps, use_prev) on ``device``;
    cached on the schedule, so repeated runs pay neither the float64 arithmetic nor the
    host-to-device copies."""
    cache = schedule.__dict__.setdefault("_device_table_cache", {})
    key = (tuple(ts), sampler, prediction_type, eta, guidance_scale, dtype, rows, device)
    hit = cache.get(key)
    if hit is not None:
        return hit
    table64 = build_table(schedule, ts, sampler, prediction_type, eta, guidance_scale)
    S = len(ts)
    entry = (
        table64.to(device=device, dtype=dtype),
        torch.tensor(ts, dtype=torch.int64).view(S, 1).expand(S, rows).contiguous().to(device),
        torch.arange(S, dtype=torch.int64, device=device),
        tuple(bool(v != 0) for v in table64[:, CZ].tolist()),
        bool((table64[:, CP] != 0).any()),
    )
    if len(cache) >= _TABLE_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = entry
    return entry


def _noise_drawer(generator, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> Callable[[], torch.Tensor]:
    """One step's standard normal noise [B, ...]; with a list of generators, row i comes from
    generator i alone (so sample i does not depend on the rest of the batch)."""
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if generator is None:
        return lambda: torch.randn(shape, dtype=draw_dtype, device=device).to(dtype)
    if isinstance(generator, torch.Generator):
        g = generator
        return lambda: torch.randn(shape, generator=g, dtype=draw_dtype,
                                   device=g.device).to(device, dtype)
    gens = list(generator)

    def draw() -> torch.Tensor:
        rows = [torch.randn(shape[1:], generator=g, dtype=draw_dtype, device=g.device)
                .to(device, dtype) for g in gens]
        return torch.stack(rows)

    return draw


def _check_cond(cond, uncond, guidance_scale, B: int, device: torch.device):
    """The model's cond argument for each step, and whether guidance is on."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ConfigError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale == 1.0:
        return cond, False
    if uncond is None:
        raise ConfigError(f"guidance_scale={guidance_scale} (classifier-free guidance) needs "
                          "uncond, the unconditional input of the model; it is None")
    if cond is None:
        raise ConfigError("uncond is given for classifier-free guidance but cond is None")
    if hasattr(cond, "pack") and hasattr(uncond, "pack"):
        # d2nwg.Condition objects (e.g. den.null_condition(1) as uncond): pack both to one
        # tensor shape so that they batch into a single model call; the denoiser unpacks.
        K = max(cond.tokens.shape[1], uncond.tokens.shape[1])
        cond, uncond = cond.pack(K), uncond.pack(K)
    for name, c in (("cond", cond), ("uncond", uncond)):
        if not isinstance(c, torch.Tensor):
            raise ShapeError(f"{name} must be a tensor for classifier-free guidance, got "
                             f"{type(c).__name__}")
        if c.dim() == 0:
            raise ShapeError(f"{name} must have a batch dimension, got a 0-d tensor")
        if c.device != device:
            raise ShapeError(f"{name} is on {c.device}, x_T on {device}")
    if cond.shape[0] != B:
        raise ShapeError(f"cond has batch size {cond.shape[0]}, x_T has {B}")
    if uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, B):
        raise ShapeError(f"uncond has shape {tuple(uncond.shape)}; expected "
                         f"{(B,) + tuple(cond.shape[1:])} or {(1,) + tuple(cond.shape[1:])}")
    if uncond.dtype != cond.dtype:
        raise DTypeError(f"uncond has dtype {uncond.dtype}, cond has {cond.dtype}")
    return torch.cat([cond, uncond.expand_as(cond)]), True


@torch.no_grad()
def sample(model: Callable, x_T: torch.Tensor, schedule: NoiseSchedule, *, sampler: str = "ddim",
           steps: int = 50, timesteps: Sequence[int] | torch.Tensor | None = None,
           eta: float = 0.0, cond: Any = None, uncond: Any = None, guidance_scale: float = 1.0,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           prediction_type: str = "epsilon", backend: str | None = None,
           cuda_graph: bool = False) -> torch.Tensor:
    """Run a diffusion sampler from ``x_T`` and return x_0 (same shape and dtype).

    Args:
        model: ``model(x_t, t, cond) -> prediction`` shaped like ``x_t``; ``t`` is a LongTensor
            ``[B]`` of training timesteps (``[2B]``, cond rows then uncond rows, under guidance).
        x_T: the starting noise ``[B, ...]`` (float32, float16, bfloat16 or float64).
        schedule: the training :class:`~d2nwg.schedule.NoiseSchedule`.
        sampler: ``"ddpm"`` (ancestral), ``"ddim"`` or ``"dpmpp_2m"`` (DPM-Solver++(2M)).
        steps: number of steps, ``1 <= steps <= T``; timesteps ``round(T - i * T / steps) - 1``.
        timesteps: explicit strictly descending timesteps in ``[0, T)``; overrides ``steps``.
        eta: DDIM's stochasticity (0 = deterministic, 1 = DDPM-like); DDIM only.
        cond, uncond: the model's condition; with ``guidance_scale != 1`` both are tensors (or
            both :class:`d2nwg.Condition`, packed here into tensors) with a
            batch dimension (``uncond``'s may be 1) and go through the model in one batched call
            per step, mixed as ``eps_u + s * (eps_c - eps_u)``.
        generator: one ``torch.Generator`` or a list of one per sample (sample i then depends
            only on ``x_T[i]`` and generator i); None uses the global RNG.
        prediction_type: what the model predicts: ``"epsilon"``, ``"v"`` or ``"sample"`` (x_0).
        backend: force a backend of the fused step ("torch", "cpp", "cuda", "triton").
        cuda_graph: on CUDA, capture the whole loop (model calls included) once per shape and
            replay it; falls back to the eager loop, with one warning, when capture fails.
    """
    plan, x, cond_in = _prepare(model, x_T, schedule, sampler, steps, timesteps, eta, cond,
                                uncond, guidance_scale, generator, prediction_type, backend)
    if cuda_graph and x.device.type == "cuda":
        out = _with_graph(plan, x, cond_in)
    else:
        if cuda_graph:
            warnings.warn("cuda_graph=True needs CUDA tensors; running eagerly", RuntimeWarning,
                          stacklevel=2)
        out = _eager(plan, x, cond_in)
    return out.view(x_T.shape)


def _prepare(model, x_T, schedule, sampler, steps, timesteps, eta, cond, uncond, guidance_scale,
             generator, prediction_type, backend) -> tuple[_Plan, torch.Tensor, Any]:
    """Validate the arguments of :func:`sample`; the plan, the state [B, N] and the cond."""
    if not callable(model):
        raise ConfigError(f"model must be callable as model(x_t, t, cond), got {type(model).__name__}")
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1 or x_T.shape[0] == 0:
        raise ShapeError(f"x_T must be a tensor [B, ...] with B >= 1, got "
                         f"{getattr(x_T, 'shape', type(x_T).__name__)}")
    if x_T.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise DTypeError(f"x_T has dtype {x_T.dtype}; expected float32, float16, bfloat16 or float64")
    if not isinstance(schedule, NoiseSchedule):
        raise ConfigError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose from {PREDICTION_TYPES}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0 <= eta < math.inf):
        raise ConfigError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta != 0 and sampler != "ddim":
        raise ConfigError(f"eta={eta} applies to sampler='ddim' only (got sampler={sampler!r})")
    ts = _resolve_timesteps(schedule.T, steps, timesteps)
    B, device = x_T.shape[0], x_T.device
    if generator is not None and not isinstance(generator, torch.Generator):
        if not isinstance(generator, (list, tuple)) or \
                not all(isinstance(g, torch.Generator) for g in generator):
            raise ConfigError("generator must be a torch.Generator or a list of one per sample")
        if len(generator) != B:
            raise ConfigError(f"generator lists {len(generator)} generators for {B} samples")
    cond_in, guided = _check_cond(cond, uncond, guidance_scale, B, device)

    rows = 2 * B if guided else B
    tab_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    table, t_table, step_idx, noise_steps, use_prev = _device_tables(
        schedule, ts, sampler, prediction_type, float(eta), float(guidance_scale), tab_dtype,
        rows, device)
    x = x_T.detach().reshape(B, -1).clone(memory_format=torch.contiguous_format)
    N = x.shape[1]
    plan = _Plan(
        model=model, shape=tuple(x_T.shape), B=B, N=N, guided=guided, table=table,
        t_table=t_table, step_idx=step_idx, noise_steps=noise_steps, use_prev=use_prev,
        run=None, draw=_noise_drawer(generator, tuple(x.shape), x.dtype, device),
    )
    plan.run = select("sampler_step", SAMPLER_STEP_BACKENDS, x, x, plan.table,
                      plan.step_idx[0], x if any(plan.noise_steps) else None,
                      x if plan.use_prev else None, guided, backend=backend).run
    if N == 0:
        plan.run = _noop
    return plan, x, cond_in


def _noop(*_) -> None:
    return None


__all__ = ["sample", "SAMPLERS", "PREDICTION_TYPES", "default_timesteps", "build_table",
           "ddpm_coefficients", "ddim_coefficients", "dpmpp_2m_coefficients",
           "prediction_coefficients"]
