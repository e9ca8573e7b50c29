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
FEW_STEPS = 10  # DPM-Solver++(3M) and UniPC are for few steps
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


def _vp_tables(schedule):
    """float32 alpha, sigma, lambda per timestep, as diffusers keeps them."""
    abar = schedule.alphas_cumprod.float()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def dpmpp_3m_baseline(model, x, schedule, steps=FEW_STEPS):
    """DPMSolverMultistepScheduler(solver_order=3).step as a plain loop: first order, then
    second, then third; the last step first order (to sigma = 0), the one before it second
    under 15 steps."""
    alpha, sigma, lam = _vp_tables(schedule)
    ts = default_timesteps(schedule.T, steps)
    ms = []
    for i, t in enumerate(ts):
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), None)
        x0 = (x - sigma[t] * eps) / alpha[t]
        ms = (ms + [x0])[-3:]
        if i + 1 == len(ts):
            x = x0  # to sigma = 0
            break
        s = ts[i + 1]
        h = lam[s] - lam[t]
        order = 1 if i == 0 else 2 if i == 1 or (i == len(ts) - 2 and len(ts) < 15) else 3
        x = (sigma[s] / sigma[t]) * x - (alpha[s] * (torch.exp(-h) - 1.0)) * x0
        if order == 2:
            r0 = (lam[t] - lam[ts[i - 1]]) / h
            d1 = (1.0 / r0) * (x0 - ms[-2])
            x = x - 0.5 * (alpha[s] * (torch.exp(-h) - 1.0)) * d1
        elif order == 3:
            r0 = (lam[t] - lam[ts[i - 1]]) / h
            r1 = (lam[ts[i - 1]] - lam[ts[i - 2]]) / h
            d1_0, d1_1 = (1.0 / r0) * (x0 - ms[-2]), (1.0 / r1) * (ms[-2] - ms[-3])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            x = (
                x
                + (alpha[s] * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha[s] * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
            )
    return x


def unipc_baseline(model, x, schedule, steps=FEW_STEPS):
    """UniPCMultistepScheduler(solver_order=2, solver_type="bh2").step as a plain loop: the
    UniC corrector of x_t with the new prediction (coefficients from a 2x2 solve, as there),
    then the UniP predictor from the corrected x_t (first order at the first and last step)."""
    alpha, sigma, lam = _vp_tables(schedule)
    ts = default_timesteps(schedule.T, steps)
    one = torch.ones(())
    ms, last, last_order = [], None, 1
    for i, t in enumerate(ts):
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), None)
        m = (x - sigma[t] * eps) / alpha[t]
        if i > 0:  # UniC: x_t again from the last corrected sample, with m in the update
            p = ts[i - 1]
            h = lam[t] - lam[p]
            b_h = torch.expm1(-h)
            x_ = sigma[t] / sigma[p] * last - alpha[t] * b_h * ms[-1]
            if last_order == 1:
                x = x_ - alpha[t] * b_h * (0.5 * (m - ms[-1]))
            else:
                rk = (lam[ts[i - 2]] - lam[p]) / h
                phi = b_h / -h - 1
                b = torch.stack([phi / b_h, 2 * (phi / -h - 0.5) / b_h])
                rhos = torch.linalg.solve(
                    torch.stack([torch.stack([one, one]), torch.stack([rk, one])]), b
                )
                d1 = (ms[-2] - ms[-1]) / rk
                x = x_ - alpha[t] * b_h * (rhos[0] * d1 + rhos[1] * (m - ms[-1]))
        ms = (ms + [m])[-2:]
        if i + 1 == len(ts):
            x = m  # the predictor to sigma = 0 returns m
            break
        last, last_order = x, 1 if i == 0 else 2
        s = ts[i + 1]
        h = lam[s] - lam[t]
        b_h = torch.expm1(-h)
        x = sigma[s] / sigma[t] * x - alpha[s] * b_h * m
        if last_order == 2:
            rk = (lam[ts[i - 1]] - lam[t]) / h
            x = x - alpha[s] * b_h * (0.5 * (ms[-2] - m) / rk)
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
        (
            f"dpmpp_3m, {FEW_STEPS} steps",
            lambda: sample(model, x_T, SCHED, sampler="dpmpp_3m", steps=FEW_STEPS),
            lambda: dpmpp_3m_baseline(model, x_T, SCHED),
        ),
        (
            f"unipc, {FEW_STEPS} steps",
            lambda: sample(model, x_T, SCHED, sampler="unipc", steps=FEW_STEPS),
            lambda: unipc_baseline(model, x_T, SCHED),
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
@pytest.mark.parametrize(
    "case", [0, 1, 2, 3, 4], ids=["ddim", "ddim_cfg", "dpmpp_2m", "dpmpp_3m", "unipc"]
)
def test_sampling(benchmark, case: int, impl: int):
    _bench(benchmark, case, impl)


if __name__ == "__main__":
    sys.exit(main())
