"""Samplers against closed forms.

For Gaussian data x0 ~ N(mu, diag(sd^2)) the marginal of x_t = alpha x0 + sigma eps is
N(alpha mu, alpha^2 sd^2 + sigma^2), the ideal noise predictor is
E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 sd^2 + sigma^2), and the probability-flow ODE
maps x_T to mu + sd (x_T - alpha_T mu) / sqrt(alpha_T^2 sd^2 + sigma_T^2) exactly. Driven by
that predictor, every sampler must map N(0, I) to (that image of) the data distribution.
"""

import contextlib
import math
import warnings

import pytest
import torch

from d2nwg import _ext
from d2nwg.errors import ConfigError, D2NWGError, DTypeError, ShapeError
from d2nwg.sampling import build_table, default_timesteps, sample
from d2nwg.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear(1000)
MU = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
SD = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64)
BACKENDS = ["torch", "cpp", "triton"]


def _need(backend):
    if backend == "cpp" and _ext.cpp_reason() is not None:
        pytest.fail(f"the cpp backend must be built for these tests: {_ext.cpp_reason()}")


class Gaussian:
    """The exact predictor (epsilon, v or sample) for Gaussian data; counts its calls."""

    def __init__(self, N, schedule=SCHED, prediction_type="epsilon"):
        cols = torch.arange(N) % len(MU)
        self.mu, self.sd = MU[cols], SD[cols]
        self.abar = schedule.alphas_cumprod
        self.prediction_type = prediction_type
        self.calls = 0

    def __call__(self, x, t, cond):
        self.calls += 1
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        a = self.abar[t].view(-1, 1)
        al, sg = a.sqrt(), (1 - a).sqrt()
        xd = x.double()
        var = a * self.sd**2 + (1 - a)
        eps = sg * (xd - al * self.mu) / var
        x0 = self.mu + al * self.sd**2 * (xd - al * self.mu) / var
        out = {"epsilon": eps, "v": al * eps - sg * x0, "sample": x0}[self.prediction_type]
        return out.to(x.dtype)

    def exact(self, x_T):
        aT = self.abar[-1]
        return (
            self.mu
            + self.sd * (x_T.double() - aT.sqrt() * self.mu) / (aT * self.sd**2 + 1 - aT).sqrt()
        )

    def groups(self, y):
        """Per data group: samples [n] of each of the len(MU) groups."""
        return [y[:, g :: len(MU)].reshape(-1).double() for g in range(len(MU))]


def _check_distribution(y, x_T, model, *, deterministic):
    """Mean and std of each group within 4 standard errors of the N(0, I) image; for a
    deterministic sampler also the discretization error (vs the exact ODE map from the same
    x_T) below one standard error."""
    aT = SCHED.alphas_cumprod[-1]
    exact = model.exact(x_T)
    for g, (yg, eg) in enumerate(zip(model.groups(y), model.groups(exact))):
        mu, sd = MU[g].item(), SD[g].item()
        v_T = aT * sd**2 + 1 - aT
        mean_t = mu - sd * aT.sqrt() * mu / v_T.sqrt()
        std_t = sd / v_T.sqrt()
        n = yg.numel()
        se_mean, se_std = std_t / math.sqrt(n), std_t / math.sqrt(2 * n)
        assert abs(yg.mean() - mean_t) < 4 * se_mean, (g, yg.mean().item(), mean_t.item())
        assert abs(yg.std() - std_t) < 4 * se_std, (g, yg.std().item(), std_t.item())
        if deterministic:
            assert abs(yg.mean() - eg.mean()) < se_mean, (
                g,
                "mean disc",
                (yg.mean() - eg.mean()).item(),
            )
            assert abs(yg.std() - eg.std()) < se_std, (g, "std disc", (yg.std() - eg.std()).item())


# Step counts where discretization error is below the sampling error of 4 x 6144 / 3 samples
# per group (DDIM is first order: its std error is about 1.6 sd / steps on this schedule; the
# rest is mostly the last step's jump to sigma = 0 from t = 1000 / steps - 1).
CASES = [("ddim", 400), ("dpmpp_2m", 60), ("dpmpp_3m", 60), ("unipc", 25)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler, steps", CASES)
def test_deterministic_samplers_map_noise_to_data(sampler, steps, backend):
    _need(backend)
    x_T = torch.randn(4, 3 * 2048, generator=torch.Generator().manual_seed(1))
    model = Gaussian(x_T.shape[1])
    y = sample(model, x_T, SCHED, sampler=sampler, steps=steps, backend=backend)
    assert y.shape == x_T.shape and y.dtype == x_T.dtype
    assert model.calls == steps
    _check_distribution(y, x_T, model, deterministic=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_maps_noise_to_data(backend):
    _need(backend)
    x_T = torch.randn(4, 3 * 2048, generator=torch.Generator().manual_seed(2))
    model = Gaussian(x_T.shape[1])
    y = sample(
        model,
        x_T,
        SCHED,
        sampler="ddpm",
        steps=500,
        backend=backend,
        generator=torch.Generator().manual_seed(3),
    )
    _check_distribution(y, x_T, model, deterministic=False)


def test_few_steps_shrink_narrow_data():
    """With few steps the last jump returns a posterior mean: less variance, not more."""
    x_T = torch.randn(4, 3 * 2048, generator=torch.Generator().manual_seed(1))
    model = Gaussian(x_T.shape[1])
    y = sample(model, x_T, SCHED, sampler="ddim", steps=10)
    exact = model.exact(x_T)
    for yg, eg in zip(model.groups(y), model.groups(exact)):
        assert yg.std() < eg.std()


def test_ddim_equations_by_hand():
    """Song et al. (2021) eq. 12 and 16 on hand-computed steps (eta = 0 and eta = 0.5)."""
    s = NoiseSchedule.linear(10, beta_start=0.05, beta_end=0.3)
    a = s.alphas_cumprod.tolist()
    eps = 0.3

    def model(x, t, cond):
        return torch.full_like(x, eps)

    x_T = torch.tensor([[1.25, -0.5]], dtype=torch.float64)
    for eta in (0.0, 0.5):
        g = torch.Generator().manual_seed(7)
        y = sample(model, x_T, s, sampler="ddim", timesteps=[9, 4], eta=eta, generator=g)
        z = torch.randn((1, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        x = x_T.clone()
        # step 9 -> 4
        x0 = (x - math.sqrt(1 - a[9]) * eps) / math.sqrt(a[9])
        sigma = eta * math.sqrt((1 - a[4]) / (1 - a[9])) * math.sqrt(1 - a[9] / a[4])
        x = math.sqrt(a[4]) * x0 + math.sqrt(1 - a[4] - sigma**2) * eps + sigma * z
        # step 4 -> alpha_bar = 1: the prediction of x0
        x = (x - math.sqrt(1 - a[4]) * eps) / math.sqrt(a[4])
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_matches_k_diffusion_form():
    """DPM-Solver++(2M) written in k-diffusion's sigma space (x / alpha, sigma / alpha)."""
    N = 12
    x_T = torch.randn(2, N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = Gaussian(N)
    ts = default_timesteps(SCHED.T, 12)
    y = sample(model, x_T, SCHED, sampler="dpmpp_2m", steps=12, backend="torch")
    abar = SCHED.alphas_cumprod
    sig = [math.sqrt((1 - abar[t]) / abar[t]) for t in ts] + [0.0]
    lam = [-math.log(v) if v > 0 else math.inf for v in sig]
    x = x_T / abar[ts[0]].sqrt()
    old = None
    for i, t in enumerate(ts):
        al = abar[t].sqrt()
        xv = x * al
        eps = model(xv, torch.full((2,), t), None)
        den = (xv - (1 - abar[t]).sqrt() * eps) / al
        h = lam[i + 1] - lam[i]
        if old is None or sig[i + 1] == 0:
            d = den
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * den - 1 / (2 * r) * old
        x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        old = den
    torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-10)


def test_ddim_eta_one_is_ddpm():
    x_T = torch.randn(3, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = Gaussian(40)
    y1 = sample(
        model,
        x_T,
        SCHED,
        sampler="ddim",
        eta=1.0,
        steps=20,
        generator=torch.Generator().manual_seed(6),
    )
    y2 = sample(
        model, x_T, SCHED, sampler="ddpm", steps=20, generator=torch.Generator().manual_seed(6)
    )
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc"])
@pytest.mark.parametrize("prediction_type", ["v", "sample"])
def test_prediction_types_agree(sampler, prediction_type):
    x_T = torch.randn(3, 30, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kw = dict(sampler=sampler, steps=15, backend="cpp" if _ext.cpp_reason() is None else "torch")
    y_eps = sample(Gaussian(30), x_T, SCHED, generator=torch.Generator().manual_seed(9), **kw)
    y = sample(
        Gaussian(30, prediction_type=prediction_type),
        x_T,
        SCHED,
        prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(9),
        **kw,
    )
    torch.testing.assert_close(y, y_eps, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_equals_premixed_predictor(backend):
    _need(backend)
    B, N, s = 3, 24, 2.5
    base = Gaussian(N)
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return base(x, t, None) + 0.1 * cond.view(-1, 1).to(x.dtype)

    def premixed(x, t, cond):
        c, u = cond
        return base(x, t, None) + 0.1 * (u + s * (c - u)).view(-1, 1).to(x.dtype)

    x_T = torch.randn(B, N, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    cond = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    uncond = torch.zeros(1, dtype=torch.float64)
    for sampler in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc"):
        calls.clear()
        y = sample(
            model,
            x_T,
            SCHED,
            sampler=sampler,
            steps=8,
            cond=cond,
            uncond=uncond,
            guidance_scale=s,
            backend=backend,
        )
        assert calls == [2 * B] * 8  # one batched call per step
        y_ref = sample(
            premixed,
            x_T,
            SCHED,
            sampler=sampler,
            steps=8,
            cond=(cond, uncond.expand(B)),
            backend=backend,
        )
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        # Not vacuous: the condition moves the result away from the unconditional one, and the
        # result is not zero (a sampler returning zeros, or ignoring the condition, passed the
        # check above).
        y_plain = sample(base, x_T, SCHED, sampler=sampler, steps=8, backend=backend)
        assert float((y - y_plain).abs().max()) > 0.1
        assert float(y.abs().min()) > 0 and float(y_plain.abs().max()) > 0.5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc"])
def test_one_model_call_per_step(sampler):
    model = Gaussian(8)
    sample(model, torch.randn(2, 8), SCHED, sampler=sampler, steps=7)
    assert model.calls == 7
    model = Gaussian(8)
    sample(model, torch.randn(2, 8), SCHED, sampler=sampler, timesteps=[900, 500, 3])
    assert model.calls == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.7)])
def test_per_sample_generators(sampler, eta, backend):
    _need(backend)
    x_T = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(11))
    model = Gaussian(10)

    def m(x, t, c):
        return model(x.reshape(x.shape[0], -1), t, c).view_as(x)

    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]  # noqa: E731
    kw = dict(sampler=sampler, eta=eta, steps=12, backend=backend)
    batched = sample(m, x_T, SCHED, generator=gens([21, 22, 23]), **kw)
    alone = sample(m, x_T[1:2], SCHED, generator=gens([22]), **kw)
    assert torch.equal(batched[1:2], alone)
    other = sample(m, x_T, SCHED, generator=gens([31, 22, 33]), **kw)
    assert torch.equal(other[1], batched[1]) and not torch.equal(other[0], batched[0])
    again = sample(m, x_T, SCHED, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(
        again, sample(m, x_T, SCHED, generator=torch.Generator().manual_seed(5), **kw)
    )


def test_default_timesteps_and_tables():
    assert default_timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert default_timesteps(10, 10) == list(range(9, -1, -1))
    assert default_timesteps(1000, 1) == [999]
    # Where T / steps does not divide: round(T - i * T / steps) - 1, worked out by hand
    # (Python's and numpy's round: halves to even, as Lin et al.'s np.round).
    assert default_timesteps(1000, 3) == [999, 666, 332]  # 666.67 -> 667, 333.33 -> 333
    assert default_timesteps(10, 4) == [9, 7, 4, 1]  # 7.5 -> 8, 2.5 -> 2
    assert default_timesteps(7, 3) == [6, 4, 1]  # 4.67 -> 5, 2.33 -> 2
    assert default_timesteps(1000, 7) == [999, 856, 713, 570, 428, 285, 142]
    for T in (7, 1000):
        for steps in range(1, T + 1, 37 if T > 100 else 1):
            ts = default_timesteps(T, steps)
            assert len(ts) == steps and ts[0] == T - 1 and ts[-1] >= 0
            assert all(a > b for a, b in zip(ts, ts[1:]))
    # every sampler's last step returns x0: CX = 0, C0 = 1, no noise (epsilon: AX = 1/alpha)
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc"):
        tab = build_table(SCHED, [999, 500, 20], sampler, "epsilon", eta=0.0)
        assert tab[-1, 5] == 0 and tab[-1, 6] == 1 and tab[-1, 7] == 0 and tab[-1, 9] == 0
        assert tab[-1, 8] == 0 and tab[-1, 10] == 0  # no history (CP, CP2) at the last step


def test_shapes_dtypes_and_cuda_graph_flag_on_cpu():
    model = Gaussian(6)

    def m(x, t, c):
        return model(x.reshape(x.shape[0], -1), t, c).view_as(x)

    x_T = torch.randn(2, 3, 2, dtype=torch.bfloat16)
    assert sample(m, x_T, SCHED, steps=5).dtype == torch.bfloat16
    x_T = torch.randn(2, 3, 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = sample(m, x_T, SCHED, steps=5, cuda_graph=True)
    assert any("CUDA" in str(x.message) for x in w)
    assert torch.equal(y, sample(m, x_T, SCHED, steps=5))


def test_bad_input_names_the_argument():
    model = Gaussian(4)
    x = torch.randn(2, 4)

    def wrong_shape(x, t, c):
        return x[:, :3]

    cases = [
        (dict(sampler="euler"), ConfigError, "sampler"),
        (dict(prediction_type="x0"), ConfigError, "prediction_type"),
        (dict(steps=0), ConfigError, "steps"),
        (dict(steps=1001), ConfigError, "steps"),
        (dict(timesteps=[5, 10]), ConfigError, "timesteps"),
        (dict(timesteps=[5, 5]), ConfigError, "timesteps"),
        (dict(timesteps=[1000, 5]), ConfigError, "timesteps"),
        (dict(timesteps=[5, -1]), ConfigError, "timesteps"),
        (dict(timesteps=[]), ConfigError, "timesteps"),
        (dict(eta=-0.1), ConfigError, "eta"),
        (dict(eta=0.5, sampler="dpmpp_2m"), ConfigError, "eta"),
        (dict(cond=torch.zeros(2), guidance_scale=2.0), ConfigError, "uncond"),
        (dict(uncond=torch.zeros(2), guidance_scale=2.0), ConfigError, "cond"),
        (dict(cond=torch.zeros(3), uncond=torch.zeros(3), guidance_scale=2.0), ShapeError, "cond"),
        (
            dict(cond=torch.zeros(2, 2), uncond=torch.zeros(2, 3), guidance_scale=2.0),
            ShapeError,
            "uncond",
        ),
        (dict(guidance_scale=float("nan")), ConfigError, "guidance_scale"),
        (dict(generator=[torch.Generator()]), ConfigError, "generator"),
        (dict(generator="seed"), ConfigError, "generator"),
        (dict(model=wrong_shape), ShapeError, "model"),
        (dict(model=None), ConfigError, "model"),
        (dict(x_T=torch.zeros(2, 4, dtype=torch.int64)), DTypeError, "x_T"),
        (dict(x_T=torch.zeros(0, 4)), ShapeError, "x_T"),
        (dict(schedule="linear"), ConfigError, "schedule"),
        (dict(backend="nope"), ConfigError, "backend"),
    ]
    for change, exc, name in cases:
        kw = dict(model=model, x_T=x, schedule=SCHED)
        kw.update(change)
        with pytest.raises(exc, match=name) as info:
            sample(kw.pop("model"), kw.pop("x_T"), kw.pop("schedule"), **kw)
        assert isinstance(info.value, D2NWGError), change


@pytest.mark.parametrize(
    "sampler, guided",
    [("ddpm", False), ("dpmpp_2m", True), ("ddim", True), ("dpmpp_3m", False), ("unipc", True)],
)
def test_graph_body_matches_eager(sampler, guided):
    """The loop that cuda_graph=True captures (static buffers, pre-drawn noise, owned tables)
    run eagerly on CPU gives what the eager loop gives (the capture itself needs a GPU)."""
    from d2nwg.sampling.api import prepare as _prepare
    from d2nwg.sampling.cuda_graph import Captured as _Captured
    from d2nwg.sampling.loop import run_eager as _eager

    B, N = 3, 10
    base = Gaussian(N)

    def model(x, t, cond):
        return base(x, t, None) + (0.1 * cond.view(-1, 1) if cond is not None else 0)

    x_T = torch.randn(B, N, generator=torch.Generator().manual_seed(12))
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(1)
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(B)]  # noqa: E731
    kw = (
        model,
        x_T,
        SCHED,
        sampler,
        9,
        None,
        0.3 if sampler == "ddim" else 0.0,
        cond,
        uncond if guided else None,
        2.0 if guided else 1.0,
    )
    plan, x, cond_in = _prepare(*kw, gens(), "epsilon", None)
    want = _eager(plan, x, cond_in).clone()
    plan, x, cond_in = _prepare(*kw, gens(), "epsilon", None)
    cap = _Captured(plan, x, cond_in)
    cap.load(plan, x, cond_in)
    cap.body(plan)
    assert torch.equal(cap.x, want)
    plan, x2, cond_in = _prepare(*kw, gens(), "epsilon", None)  # replay with new inputs
    cap.load(plan, x2 * 0.5, cond_in)
    cap.body(plan)
    plan, x3, cond_in = _prepare(*kw, gens(), "epsilon", None)
    assert torch.equal(cap.x, _eager(plan, x3 * 0.5, cond_in))


class _FakeCuda:
    """Just enough of torch.cuda for d2nwg.sampling.cuda_graph.run_with_graph on CPU tensors.

    A capture runs the loop (so that a model which cannot be captured raises, as .item()
    would) and records it; replay() runs what was recorded; the state a replay starts from is
    rebuilt from the static inputs, so running during "capture" changes nothing visible. Like
    torch.cuda.graph, a capture that fails leaves the capture stream current.
    """

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self):
            self.work, self.replays = [], 0

        def replay(self):
            self.replays += 1
            for fn in self.work:
                fn()

    def __init__(self, monkeypatch):
        from d2nwg.sampling import cuda_graph

        self.main = self.current = self.Stream("main")
        self.capturing, self.graphs = None, []
        fake = self

        @contextlib.contextmanager
        def stream(s):
            before, fake.current = fake.current, s
            try:
                yield
            finally:
                fake.current = before

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, capture_error_mode="global"):
            before = fake.current
            fake.current, fake.capturing = stream or fake.Stream("capture"), g
            try:
                yield
            except BaseException:
                fake.capturing = None
                raise RuntimeError(
                    "CUDA error: operation failed due to a previous error during capture"
                ) from None  # stream not restored
            fake.capturing, fake.current = None, before

        def new_graph():
            fake.graphs.append(fake.Graph())
            return fake.graphs[-1]

        body = cuda_graph.Captured.body

        def recording_body(cap, plan):
            if fake.capturing is not None:
                fake.capturing.work.append(lambda: body(cap, plan))
            body(cap, plan)

        cuda = torch.cuda
        monkeypatch.setattr(cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(cuda, "mem_get_info", lambda d=None: (2**34, 2**35))
        monkeypatch.setattr(cuda, "current_stream", lambda d=None: fake.current)
        monkeypatch.setattr(cuda, "Stream", lambda d=None: fake.Stream())
        monkeypatch.setattr(cuda, "stream", stream)
        monkeypatch.setattr(cuda, "set_stream", lambda s: setattr(fake, "current", s))
        monkeypatch.setattr(cuda, "synchronize", lambda d=None: None)
        monkeypatch.setattr(cuda, "CUDAGraph", new_graph)
        monkeypatch.setattr(cuda, "graph", graph)
        monkeypatch.setattr(cuda_graph.Captured, "body", recording_body)


class _Net(torch.nn.Module):
    """The Gaussian predictor times a parameter, plus a condition term; optionally fails to
    capture (as a model that calls .item() does)."""

    def __init__(self, N, fake, capturable=True):
        super().__init__()
        self.base, self.fake, self.capturable = Gaussian(N), fake, capturable
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, t, cond):
        if not self.capturable and self.fake.capturing is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return self.base(x, t, None) * self.scale + 0.1 * cond.view(-1, 1)


def _graph_run(model, x_T, cond, seed, graph, sampler="ddpm"):
    from d2nwg.sampling.api import prepare as _prepare
    from d2nwg.sampling.cuda_graph import run_with_graph as _with_graph
    from d2nwg.sampling.loop import run_eager as _eager

    gens = [torch.Generator().manual_seed(seed + i) for i in range(x_T.shape[0])]
    plan, x, cond_in = _prepare(
        model,
        x_T,
        SCHED,
        sampler,
        6,
        None,
        0.0,
        cond,
        torch.zeros_like(cond[:1]),
        2.0,
        gens,
        "epsilon",
        None,
    )
    return (_with_graph if graph else _eager)(plan, x, cond_in)


def test_graph_wrapper_replays_new_inputs_with_per_sample_generators(monkeypatch):
    """cuda_graph=True's wrapper (capture mocked on CPU): the first call returns the warm-up's
    answer, later calls replay with x_T, cond and the per-sample noise copied in; a
    reallocated parameter makes it capture again instead of replaying stale addresses."""
    fake = _FakeCuda(monkeypatch)
    B, N = 3, 10
    net = _Net(N, fake)
    g = torch.Generator().manual_seed(5)
    inputs = [
        (
            torch.randn(B, N, generator=g, dtype=torch.float64),
            torch.randn(B, generator=g, dtype=torch.float64),
            100 * i,
        )
        for i in range(3)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, (x_T, cond, seed) in enumerate(inputs[:2]):
            got = _graph_run(net, x_T, cond, seed, graph=True)
            assert torch.equal(got, _graph_run(net, x_T, cond, seed, graph=False)), i
        assert len(fake.graphs) == 1 and fake.graphs[0].replays == 1
        old = net.scale.data  # kept alive: its address is not reused
        net.scale.data = torch.full((), 0.5, dtype=torch.float64)
        x_T, cond, seed = inputs[2]
        got = _graph_run(net, x_T, cond, seed, graph=True)
        assert torch.equal(got, _graph_run(net, x_T, cond, seed, graph=False))
        assert len(fake.graphs) == 2 and fake.graphs[1].replays == 0, "stale graph replayed"
        assert torch.equal(_graph_run(net, x_T, cond, seed, graph=True), got)
        assert fake.graphs[1].replays == 1
    assert fake.current is fake.main
    del old


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_graph_wrapper_replays_the_multistep_samplers(sampler, monkeypatch):
    """The multistep samplers under cuda_graph=True (capture mocked on CPU): the captured
    loop owns its x0 history buffers (one or two, cleared at every replay), and replays with
    new inputs give the eager answer."""
    fake = _FakeCuda(monkeypatch)
    net = _Net(12, fake)
    g = torch.Generator().manual_seed(8)
    for i in range(3):
        x_T = torch.randn(2, 12, generator=g, dtype=torch.float64)
        cond = torch.randn(2, generator=g, dtype=torch.float64)
        got = _graph_run(net, x_T, cond, 0, graph=True, sampler=sampler)
        assert torch.equal(got, _graph_run(net, x_T, cond, 0, graph=False, sampler=sampler)), i
    assert len(fake.graphs) == 1 and fake.graphs[0].replays == 2


def test_graph_wrapper_falls_back_once_and_restores_the_stream(monkeypatch):
    """A model that cannot be captured: one warning, the eager answer every time, and the
    caller's stream current again (torch.cuda.graph leaves the capture stream current when
    capture_end fails)."""
    fake = _FakeCuda(monkeypatch)
    B, N = 2, 6
    net = _Net(N, fake, capturable=False)
    x_T = torch.randn(B, N, dtype=torch.float64)
    cond = torch.randn(B, dtype=torch.float64)
    for i in range(2):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = _graph_run(net, x_T * (i + 1), cond, 7, graph=True)
        msgs = [str(x.message) for x in w if "cuda_graph" in str(x.message)]
        assert len(msgs) == (1 if i == 0 else 0), msgs
        assert i > 0 or "could not capture" in msgs[0]
        assert torch.equal(got, _graph_run(net, x_T * (i + 1), cond, 7, graph=False))
        assert fake.current is fake.main, "the capture stream was left current"
    assert len(fake.graphs) == 1 and fake.graphs[0].replays == 0


def test_graph_wrapper_under_autocast_captures_without_the_weight_cache(monkeypatch):
    """Under CUDA autocast the warm-up and the capture run with autocast's weight cache off
    (cached casts would be freed when the caller's autocast region ends, under the graph),
    and a graph captured under autocast is not replayed without it (nor the reverse)."""
    fake = _FakeCuda(monkeypatch)
    amp = {"on": False}
    seen = []

    @contextlib.contextmanager
    def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        assert device_type == "cuda" and dtype == torch.float16
        seen.append(cache_enabled)
        yield

    monkeypatch.setattr(
        torch, "is_autocast_enabled", lambda device_type=None: amp["on"] and device_type == "cuda"
    )
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.float16)
    monkeypatch.setattr(torch, "autocast", autocast)
    net = _Net(6, fake)
    x_T, cond = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    _graph_run(net, x_T, cond, 3, graph=True)
    assert seen == [] and len(fake.graphs) == 1
    amp["on"] = True
    want = _graph_run(net, x_T, cond, 3, graph=False)
    assert torch.equal(_graph_run(net, x_T, cond, 3, graph=True), want)
    assert seen == [False, False], "warm-up and capture must run with cache_enabled=False"
    assert len(fake.graphs) == 2 and fake.graphs[0].replays == 0
    _graph_run(net, x_T, cond, 3, graph=True)
    amp["on"] = False
    _graph_run(net, x_T, cond, 3, graph=True)
    assert [g.replays for g in fake.graphs] == [1, 1]


def test_model_output_shape_checked_at_every_step():
    """An output that changes shape after the first step is an error, not a silent reshape."""
    calls = []

    def model(x, t, cond=None):
        calls.append(1)
        out = torch.zeros_like(x)
        return out if len(calls) == 1 else out.reshape(x.shape[0], -1)  # same numel, new shape

    with pytest.raises(ShapeError, match="returned shape"):
        sample(model, torch.randn(2, 3, 4), NoiseSchedule.linear(100), sampler="ddim", steps=5)
    assert len(calls) == 2
