"""Noise schedules: float64 tables, closed forms, validation."""

import math

import pytest
import torch

from d2nwg.errors import ConfigError, D2NWGError, DTypeError, NonFiniteError, ShapeError
from d2nwg.schedule import NoiseSchedule


def test_linear_tables_in_float64():
    s = NoiseSchedule.linear(1000, beta_start=1e-4, beta_end=2e-2)
    assert s.T == len(s) == s.num_timesteps == 1000
    for name in ("betas", "alphas_cumprod", "alphas", "sigmas_t", "log_snr", "sigmas"):
        t = getattr(s, name)
        assert t.dtype == torch.float64 and t.shape == (1000,), name
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(2e-2)
    abar = 1.0
    for t in (0, 1, 2):
        abar *= 1 - (1e-4 + t * (2e-2 - 1e-4) / 999)
        assert s.alphas_cumprod[t].item() == pytest.approx(abar, rel=1e-14)
    # the usual 1000-step schedule ends near 4.04e-5 (needs float64 to be right)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    a = s.alphas_cumprod
    torch.testing.assert_close(s.alphas**2 + s.sigmas_t**2, torch.ones_like(a))
    torch.testing.assert_close(s.log_snr, torch.log(a / (1 - a)))
    torch.testing.assert_close(s.sigmas, ((1 - a) / a).sqrt())
    assert bool((s.log_snr[1:] < s.log_snr[:-1]).all())


def test_scaled_linear_and_from_betas():
    s = NoiseSchedule.scaled_linear(50, beta_start=0.00085, beta_end=0.012)
    want = torch.linspace(0.00085**0.5, 0.012**0.5, 50, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.betas, want)
    lin = NoiseSchedule.linear(20)
    for betas in (lin.betas.float(), lin.betas.tolist()):
        b = NoiseSchedule.from_betas(betas)
        torch.testing.assert_close(b.alphas_cumprod, lin.alphas_cumprod, rtol=1e-6, atol=0)


def test_cosine_closed_form():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.cosine(T, s=s_)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        # alpha_bar at index t is alpha_bar(t + 1) of the paper (beta_t is the step t -> t+1)
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999 + 1e-15


def test_to_device(device):
    s = NoiseSchedule.linear(10)
    m = s.to(device)
    assert m.device.type == device.type and m.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(m.alphas_cumprod.cpu(), s.alphas_cumprod)
    assert s.device.type == "cpu" and "linear" in repr(m)


@pytest.mark.parametrize(
    "build, exc, name",
    [
        (lambda: NoiseSchedule.linear(0), ConfigError, "T"),
        (lambda: NoiseSchedule.linear(10.5), ConfigError, "T"),
        (lambda: NoiseSchedule.linear(10, beta_start=0.0), ConfigError, "beta_start"),
        (lambda: NoiseSchedule.linear(10, beta_end=1.0), ConfigError, "beta_end"),
        (lambda: NoiseSchedule.scaled_linear(10, beta_start=-1e-3), ConfigError, "beta_start"),
        (lambda: NoiseSchedule.cosine(10, s=-0.1), ConfigError, "s must"),
        (lambda: NoiseSchedule.from_betas(torch.zeros(2, 3) + 0.1), ShapeError, "betas"),
        (lambda: NoiseSchedule.from_betas(torch.tensor([])), ShapeError, "betas"),
        (lambda: NoiseSchedule.from_betas(torch.tensor([1, 2])), DTypeError, "betas"),
        (
            lambda: NoiseSchedule.from_betas(torch.tensor([0.1, float("nan")])),
            NonFiniteError,
            "betas",
        ),
        (lambda: NoiseSchedule.from_betas([0.1, 1.0]), ConfigError, "betas"),
        (lambda: NoiseSchedule.from_betas([0.1, 0.0]), ConfigError, "betas"),
        (lambda: NoiseSchedule.from_betas(["a"]), ConfigError, "betas"),
    ],
)
def test_bad_input_names_the_argument(build, exc, name):
    with pytest.raises(exc, match=name) as info:
        build()
    assert isinstance(info.value, D2NWGError)
