"""CPU benchmark: full sampling runs with a tiny denoiser, where per-step overhead dominates.

d2nwg.sample (one model call and one fused C++ step per step, coefficients precomputed into a
table) against plain PyTorch loops written the way diffusers' schedulers do it: per-step
Python lookups of alphas_cumprod and the update in separate tensor ops. Every figure is a
ratio of medians measured in the same run.

    python bench/bench_sampling.py          # prints a table
    pytest bench/bench_sampling.py          # pytest-benchmark
"""

from __future__ import annotations

import statistics
import sys

import pytest
import torch

from d2nwg.sampling import default_timesteps, sample
from d2nwg.schedule import NoiseSchedule
from d2nwg.timing import median_ms

B, N, STEPS = 8, 64, 50
SCHED = NoiseSchedule.linear(1000)


class TinyDenoiser(torch.nn.Module):
    """One linear layer plus a timestep embedding (and an optional additive condition): a
    model so small that the sampler's own per-step overhead dominates."""

    def __init__(self, n: int = N, T: int = 1000) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(n))
        self.temb = torch.nn.Parameter(0.1 * torch.randn(T, n))

    def forward(self, x, t, cond=None):
        h = torch.nn.functional.linear(x, self.weight, self.bias) + self.temb[t]
        return h if cond is None else h + cond


# ---- baselines: diffusers-style loops (DDIMScheduler.step / DPMSolverMultistepScheduler) ----
def ddim_baseline(model, x, schedule, steps=STEPS, cond=None, uncond=None, guidance_scale=1.0):
    abar = schedule.alphas_cumprod.float()  # diffusers keeps a float32 table
    final = torch.tensor(1.0)
    ts = default_timesteps(schedule.T, steps)
    guided = uncond is not None and guidance_scale != 1.0
    for i, t in enumerate(ts):
        if guided:
            x_in = torch.cat([x, x])
            out = model(
                x_in,
                torch.full((x_in.shape[0],), t, dtype=torch.long, device=x.device),
                torch.cat([cond, uncond]),
            )
            eps_c, eps_u = out.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), cond)
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        alpha_prod_t = abar[t]
        alpha_prod_t_prev = abar[prev_t] if prev_t >= 0 else final
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (x - beta_prod_t**0.5 * eps) / alpha_prod_t**0.5
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * eps
        x = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    return x


def dpmpp_2m_baseline(model, x, schedule, steps=STEPS):
    abar = schedule.alphas_cumprod.float()
    ts = default_timesteps(schedule.T, steps)
    alpha = abar.sqrt()
    sigma = (1 - abar).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    old = None
    for i, t in enumerate(ts):
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), None)
        x0 = (x - sigma[t] * eps) / alpha[t]
        if i + 1 == len(ts):
            x = x0  # to sigma = 0
            break
        s = ts[i + 1]
        h = lam[s] - lam[t]
        if old is None:
            x = (sigma[s] / sigma[t]) * x - (alpha[s] * (torch.exp(-h) - 1.0)) * x0
        else:
            h_0 = lam[t] - lam[ts[i - 1]]
            r0 = h_0 / h
            d1 = (1.0 / r0) * (x0 - old)
            x = (
                (sigma[s] / sigma[t]) * x
                - (alpha[s] * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha[s] * (torch.exp(-h) - 1.0)) * d1
            )
        old = x0
    return x


def _cases():
    torch.manual_seed(0)
    model = TinyDenoiser().eval()
    x_T = torch.randn(B, N)
    cond, uncond = torch.randn(B, N), torch.zeros(B, N)
    return [
        (
            "ddim, 50 steps",
            lambda: sample(model, x_T, SCHED, sampler="ddim", steps=STEPS),
            lambda: ddim_baseline(model, x_T, SCHED),
        ),
        (
            "ddim + CFG 3.0, 50 steps",
            lambda: sample(
                model,
                x_T,
                SCHED,
                sampler="ddim",
                steps=STEPS,
                cond=cond,
                uncond=uncond,
                guidance_scale=3.0,
            ),
            lambda: ddim_baseline(model, x_T, SCHED, cond=cond, uncond=uncond, guidance_scale=3.0),
        ),
        (
            "dpmpp_2m, 50 steps",
            lambda: sample(model, x_T, SCHED, sampler="dpmpp_2m", steps=STEPS),
            lambda: dpmpp_2m_baseline(model, x_T, SCHED),
        ),
    ]


@torch.no_grad()
def run_table(reps: int = 30) -> list[dict]:
    rows = []
    cases = _cases()
    for _, fused, base in cases:  # warm every path (thread pools, caches) first
        median_ms(fused, "cpu", repeat=5, warmup=3)
        median_ms(base, "cpu", repeat=5, warmup=3)
    for name, fused, base in cases:
        y, y_base = fused(), base()
        err = ((y - y_base).abs().max() / y_base.abs().max()).item()
        # interleave the two so that drift in machine load hits both alike
        f_ms, b_ms = [], []
        for _ in range(3):
            f_ms.append(median_ms(fused, "cpu", repeat=reps // 3 + 1, warmup=3))
            b_ms.append(median_ms(base, "cpu", repeat=reps // 3 + 1, warmup=3))
        f, b = statistics.median(f_ms), statistics.median(b_ms)
        rows.append(
            {"case": name, "d2nwg_ms": f, "baseline_ms": b, "ratio": b / f, "max_rel_diff": err}
        )
    return rows


def main() -> int:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; one-layer denoiser, "
        f"x [{B}, {N}]"
    )
    print(f"{'case':28s} {'d2nwg ms':>9s} {'baseline ms':>12s} {'ratio':>6s} {'rel diff':>9s}")
    for r in run_table():
        print(
            f"{r['case']:28s} {r['d2nwg_ms']:9.3f} {r['baseline_ms']:12.3f} {r['ratio']:6.2f}x "
            f"{r['max_rel_diff']:9.1e}"
        )
    print("ratio = baseline median / d2nwg median (>1: d2nwg faster); target >= 2x")
    return 0


# ---- pytest-benchmark --------------------------------------------------------------------
def _bench(benchmark, index: int, which: int):
    fn = _cases()[index][1 + which]
    with torch.no_grad():
        benchmark(fn)


@pytest.mark.parametrize("impl", [0, 1], ids=["d2nwg", "diffusers_style"])
@pytest.mark.parametrize("case", [0, 1, 2], ids=["ddim", "ddim_cfg", "dpmpp_2m"])
def test_sampling(benchmark, case: int, impl: int):
    _bench(benchmark, case, impl)


if __name__ == "__main__":
    sys.exit(main())
