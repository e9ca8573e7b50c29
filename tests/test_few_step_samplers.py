"""The few-step samplers, DPM-Solver++(3M) ("dpmpp_3m") and UniPC-2 bh2 ("unipc"), against
their oracles: diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=3) and UniPCMultistepScheduler(solver_order=2, solver_type="bh2",
predict_x0=True), both final_sigmas_type="zero", run step by step on the same timesteps with
the exact predictor of Gaussian data (tests/test_sampling.py's ``Gaussian``, whose score is
known in closed form); the convergence order against the exact probability-flow map; every
backend against the torch reference; batches, generators and the CUDA-graph loop.

diffusers is a test dependency (the Makefile installs it): these tests run, they never skip.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

import d2nwg
from d2nwg import _ext
from d2nwg.ops.sampler_step_op import C0, COLUMNS, CP, CP2, CX
from d2nwg.sampling import build_table, default_timesteps, sample
from d2nwg.sampling import samplers as sampler_registry
from d2nwg.schedule import NoiseSchedule

# The Gaussian data and its exact predictor, shared with tests/test_sampling.py (loaded by
# path: the tests run with --import-mode=importlib, so test modules do not import each other).
_spec = importlib.util.spec_from_file_location(
    "d2nwg_tests_sampling", os.path.join(os.path.dirname(__file__), "test_sampling.py")
)
_sampling_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sampling_tests)
Gaussian, SCHED = _sampling_tests.Gaussian, _sampling_tests.SCHED

FEW_STEP = ("dpmpp_3m", "unipc")
BACKENDS = ["torch", "cpp", "triton"]
# (diffusers' set_timesteps trips a numpy 2 deprecation on torch tensors: not ours to fix)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}
ORACLE_RTOL = 1e-5  # measured: below 4e-7 at 8, 10 and 20 steps (diffusers runs in float32)


def _need(backend):
    if backend == "cpp" and _ext.cpp_reason() is not None:
        pytest.fail(f"the cpp backend must be built for these tests: {_ext.cpp_reason()}")


def diffusers_scheduler(sampler: str, prediction_type: str, schedule: NoiseSchedule = SCHED):
    """The oracle scheduler of ``sampler``, on ``schedule``'s betas, trailing spacing."""
    common = dict(
        num_train_timesteps=schedule.T,
        trained_betas=schedule.betas.numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction_type],
        timestep_spacing="trailing",
        final_sigmas_type="zero",
    )
    if sampler == "unipc":
        return UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True, **common)
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3, **common)


def set_timesteps(sch, ts: list[int]) -> None:
    """``ts`` on the oracle: DPMSolverMultistepScheduler takes explicit timesteps; for UniPC
    (whose set_timesteps takes a count only) set the timesteps and sigmas as set_timesteps
    does (its sigmas: sqrt((1 - abar) / abar) at each timestep, float32, then a final 0)."""
    if isinstance(sch, DPMSolverMultistepScheduler):
        sch.set_timesteps(timesteps=ts)
    else:
        sch.set_timesteps(len(ts))
        if sch.timesteps.tolist() != ts:
            full = ((1 - sch.alphas_cumprod) / sch.alphas_cumprod) ** 0.5
            sch.timesteps = torch.tensor(ts, dtype=torch.int64)
            sch.sigmas = torch.cat([full[ts], torch.zeros(1)]).to(torch.float32)
    assert sch.timesteps.tolist() == ts


def diffusers_sample(sampler, ts, prediction_type, x_T, schedule=SCHED) -> torch.Tensor:
    """The oracle's run: one model call and one scheduler.step per timestep."""
    sch = diffusers_scheduler(sampler, prediction_type, schedule)
    set_timesteps(sch, ts)
    model = Gaussian(x_T.shape[1], schedule, prediction_type)
    x = x_T.clone()
    for t in sch.timesteps:
        out = model(x, torch.full((x.shape[0],), int(t)), None)
        x = sch.step(out, t, x).prev_sample
    return x


def rel_diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _x_T(B=4, N=30, seed=0, dtype=torch.float64):
    return torch.randn(B, N, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------
# The oracle: diffusers, step by step, on the same timesteps.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", FEW_STEP)
@pytest.mark.parametrize("steps", [8, 10, 20])
def test_default_timesteps_are_diffusers_trailing_spacing(sampler, steps):
    sch = diffusers_scheduler(sampler, "epsilon")
    sch.set_timesteps(steps)
    assert sch.timesteps.tolist() == default_timesteps(SCHED.T, steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("steps", [8, 10, 20])
@pytest.mark.parametrize("sampler", FEW_STEP)
def test_matches_diffusers(sampler, steps, prediction_type):
    x_T = _x_T()
    ts = default_timesteps(SCHED.T, steps)
    want = diffusers_sample(sampler, ts, prediction_type, x_T)
    model = Gaussian(x_T.shape[1], prediction_type=prediction_type)
    got = sample(model, x_T, SCHED, sampler=sampler, steps=steps, prediction_type=prediction_type)
    assert model.calls == steps
    assert rel_diff(got, want) < ORACLE_RTOL, rel_diff(got, want)
    # Not vacuous: the few steps land visibly off the exact probability-flow map.
    assert rel_diff(got, model.exact(x_T)) > 100 * ORACLE_RTOL


@pytest.mark.parametrize("sampler", FEW_STEP)
def test_matches_diffusers_on_explicit_timesteps(sampler):
    """Uneven explicit timesteps (so that the step-size ratios r vary), on a cosine schedule,
    float32 samples: the x0 history, the corrector and both orders at uneven steps."""
    sched = NoiseSchedule.cosine(1000)
    ts = [985, 900, 731, 640, 402, 330, 180, 97, 41, 12]
    x_T = _x_T(3, 33, seed=1)
    want = diffusers_sample(sampler, ts, "epsilon", x_T, sched)
    got = sample(Gaussian(33, sched), x_T, sched, sampler=sampler, timesteps=ts)
    assert rel_diff(got, want) < ORACLE_RTOL, rel_diff(got, want)
    got32 = sample(Gaussian(33, sched), x_T.float(), sched, sampler=sampler, timesteps=ts)
    assert got32.dtype == torch.float32 and rel_diff(got32, want) < 1e-5


@pytest.mark.parametrize("sampler", FEW_STEP)
def test_oracle_check_catches_every_perturbed_coefficient(sampler, monkeypatch):
    """A planted bug: each non-zero update coefficient (CX, C0, CP, CP2 of every step), alone
    multiplied by 1.01, takes the 8-step run beyond the oracle tolerance (the least sensitive
    one by about 3x)."""
    steps, x_T = 8, _x_T()
    ts = default_timesteps(SCHED.T, steps)
    want = diffusers_sample(sampler, ts, "epsilon", x_T)
    honest = sampler_registry.REGISTRY[sampler]
    table = build_table(SCHED, ts, sampler, "epsilon")
    planted = 0
    for col in (CX, C0, CP, CP2):
        for k in range(steps):
            if table[k, col] == 0:
                continue

            def perturbed(a_t, a_prev, eta, col=col, k=k):
                cols = honest.coefficients(a_t, a_prev, eta)
                cols[col] = cols[col].clone()
                cols[col][k] *= 1.01
                return cols

            monkeypatch.setitem(
                sampler_registry.REGISTRY, sampler, sampler_registry.Sampler(sampler, perturbed)
            )
            fresh = NoiseSchedule.linear(1000)  # (device tables are cached per schedule)
            got = sample(Gaussian(x_T.shape[1], fresh), x_T, fresh, sampler=sampler, steps=steps)
            assert rel_diff(got, want) > ORACLE_RTOL, (COLUMNS[col], k, rel_diff(got, want))
            planted += 1
    assert planted >= 3 * (steps - 2)  # CX, C0, CP at least on the inner steps


# ----------------------------------------------------------------------------------------
# Closed forms: the coefficients' structure, and the order of convergence.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", FEW_STEP)
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 14, 15, 20])
def test_step_orders_in_the_table(sampler, steps):
    """Which history each step reads (diffusers' orders): the first step none, the last step
    lands on sigma = 0 and returns x0 (C0 = 1, nothing else); dpmpp_3m reads two predictions
    back from its third step on, except the step before the last under 15 steps; unipc's
    corrector reads two back from its third step on (its predictor one back)."""
    ts = default_timesteps(SCHED.T, steps)
    tab = build_table(SCHED, ts, sampler, "epsilon")
    assert tab[-1, C0] == 1 and tab[-1, CX] == 0 and tab[-1, CP] == 0 and tab[-1, CP2] == 0
    for k in range(steps - 1):
        reads = (bool(tab[k, CP] != 0), bool(tab[k, CP2] != 0))
        if k == 0:
            want = (False, False)
        elif sampler == "dpmpp_3m":
            second = k == 1 or (k == steps - 2 and steps < 15)
            want = (True, not second)
        else:
            want = (True, k >= 2)
        assert reads == want, (k, reads)
        assert 0 < tab[k, CX] < 1  # sigma_{k+1} / sigma_k


def test_weights_are_exact_for_data_at_one_point():
    """Data at one point c: the flow is x_t = alpha_t c from x_T = alpha_T c, and every
    prediction is c, so each step must map alpha_k c to alpha_{k+1} c exactly:
    CX alpha_k + C0 + CP + CP2 = alpha_{k+1} (the exponential integrator is exact for a
    constant x0; the difference terms, and UniPC's corrector, weigh a constant by zero)."""
    for sampler in FEW_STEP:
        ts = [999, 850, 640, 500, 333, 200, 120, 60, 20]
        tab = build_table(SCHED, ts, sampler, "epsilon")
        a = SCHED.alphas_cumprod[ts].sqrt().tolist() + [1.0]
        for k in range(len(ts)):
            s = tab[k, CX] * a[k] + tab[k, C0] + tab[k, CP] + tab[k, CP2]
            assert abs(float(s) - a[k + 1]) < 1e-12, (sampler, k)


@pytest.mark.parametrize(
    "sampler, min_order", [("dpmpp_2m", 1.9), ("dpmpp_3m", 2.2), ("unipc", 2.8)]
)
def test_convergence_order_against_the_exact_flow(sampler, min_order):
    """Error at the last step, against the exact probability-flow map of Gaussian data from
    x_T to t_last followed by its posterior mean (what the last step returns), with 40 and 80
    evenly spaced steps from t = 999 to 199: it shrinks like steps^-order. UniPC-2 with its
    corrector is third order; DPM-Solver++(3M)'s first step is first order, so its global
    order tends to 2 (measured 2.35 here); DPM-Solver++(2M) second order."""
    N = 30
    x_T = _x_T(8, N, seed=1)
    model = Gaussian(N)
    abar = SCHED.alphas_cumprod

    def exact(t):
        aT, a = abar[-1], abar[t]
        x_t = (
            a.sqrt() * model.mu
            + (a * model.sd**2 + 1 - a).sqrt()
            * (x_T - aT.sqrt() * model.mu)
            / (aT * model.sd**2 + 1 - aT).sqrt()
        )
        return model.mu + a.sqrt() * model.sd**2 * (x_t - a.sqrt() * model.mu) / (
            a * model.sd**2 + 1 - a
        )

    errs = []
    for S in (40, 80):
        ts = [int(round(999 - i * 800 / (S - 1))) for i in range(S)]
        y = sample(model, x_T, SCHED, sampler=sampler, timesteps=ts)
        errs.append((y - exact(ts[-1])).abs().max().item())
    order = math.log2(errs[0] / errs[1])
    assert order > min_order, (errs, order)


# ----------------------------------------------------------------------------------------
# Every backend against the torch reference; batches, guidance, generators, the graph loop.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", FEW_STEP)
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (5, 2, 3)])
def test_backends_match_the_torch_reference(backend, sampler, shape):
    """Whole 10-step runs in float32 (odd sizes, guided), fresh inputs per shape."""
    _need(backend)
    g = torch.Generator().manual_seed(sum(shape))
    B, N = shape[0], math.prod(shape[1:])
    base = Gaussian(N)

    def model(x, t, cond):
        flat = x.reshape(x.shape[0], -1)
        return (base(flat, t, None) + 0.1 * cond.view(-1, 1).to(x.dtype)).view_as(x)

    x_T = torch.randn(shape, generator=g)
    cond, uncond = torch.randn(B, generator=g), torch.zeros(1)
    kw = dict(sampler=sampler, steps=10, cond=cond, uncond=uncond, guidance_scale=1.5)
    want = sample(model, x_T, SCHED, backend="torch", **kw)
    got = sample(model, x_T, SCHED, backend=backend, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", FEW_STEP)
def test_sample_i_does_not_depend_on_the_batch(backend, sampler):
    """Sample i alone or in a batch, with one generator per sample: bit-identical."""
    _need(backend)
    x_T = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(11))
    base = Gaussian(10)

    def model(x, t, c):
        return base(x.reshape(x.shape[0], -1), t, c).view_as(x)

    def gens(seeds):
        return [torch.Generator().manual_seed(k) for k in seeds]

    kw = dict(sampler=sampler, steps=9, backend=backend)
    batched = sample(model, x_T, SCHED, generator=gens([1, 2, 3]), **kw)
    for i in range(3):
        alone = sample(model, x_T[i : i + 1], SCHED, generator=gens([i + 1]), **kw)
        assert torch.equal(batched[i : i + 1], alone)


def test_registry_config_and_cli_take_the_new_samplers(capsys):
    from d2nwg.cli import build_parser, main

    assert set(FEW_STEP) <= set(d2nwg.SAMPLERS)
    for name in FEW_STEP:
        assert d2nwg.D2NWGConfig(sampler=name).sampler == name
        args = build_parser().parse_args(
            ["generate", "--generator", "g", "--out", "o", "--sampler", name]
        )
        assert args.sampler == name
    with pytest.raises(d2nwg.ConfigError, match="sampler"):
        d2nwg.D2NWGConfig(sampler="unipc3")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in d2nwg.SAMPLERS)
