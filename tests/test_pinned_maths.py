"""Core maths pinned to values derived by hand, so that a small plausible change (a rounding,
a threshold, an index) fails a test instead of passing a loose statistical check."""

import pytest
import torch

import d2nwg
from d2nwg.tokenizer import normalization


def test_normalization_scale_is_std_rounded_to_a_power_of_two():
    std = torch.tensor([1.0, 0.3, 0.36, 2.8, 3.0, 0.7, 0.75, 1e-3], dtype=torch.float64)
    # log2: 0, -1.74, -1.47, 1.49, 1.58, -0.51, -0.42, -9.97 -> rounded exponents
    want = [1.0, 0.25, 0.5, 2.0, 4.0, 0.5, 1.0, 2.0**-10]
    _, scale = normalization(torch.zeros_like(std), std)
    assert scale.tolist() == want


def test_normalization_centers_only_where_the_mean_matters():
    std = torch.ones(6, dtype=torch.float64)
    mean = torch.tensor([0.5, 0.49, -0.5, -0.6, 1.001, 3.14159], dtype=torch.float64)
    shift, _ = normalization(mean, std)
    # |mean| >= std / 2 is centered; the shift keeps bfloat16's 8 significant bits:
    # 0.6 -> 154 / 256 = 0.6015625, 1.001 -> 1.0, 3.14159 -> 201 / 64 = 3.140625.
    assert shift.tolist() == [0.5, 0.0, -0.5, -0.6015625, 1.0, 3.140625]
    # the threshold scales with std
    shift, _ = normalization(torch.tensor([1.0, 1.0]).double(), torch.tensor([2.0, 2.1]).double())
    assert shift.tolist() == [1.0, 0.0]


def test_tokens_of_a_fitted_layer_by_hand():
    """One centered and one uncentered layer through fit / tokenize, checked element by element
    against (x - shift) / scale with the shift and scale worked out by hand."""
    norm = torch.tensor([0.9, 1.1, 1.0, 1.0])  # mean 1.0, std 0.0707 -> scale 2^-4, shift 1.0
    w = torch.tensor([0.3, -0.3, 0.3, -0.3])  # mean 0, std 0.3 -> scale 0.25, shift 0
    tok = d2nwg.WeightTokenizer.from_state_dict({"norm": norm, "w": w}, chunk_size=4)
    tok.fit([{"norm": norm, "w": w}])
    tokens = tok.tokenize([{"norm": norm, "w": w}])[0]
    rows = {spec.name: i for i, spec in enumerate(tok.layers)}
    torch.testing.assert_close(tokens[rows["norm"]], (norm - 1.0) * 16, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[rows["w"]], w * 4, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA graph needs a GPU")
def test_cuda_graph_capture_matches_eager_on_a_gpu():
    """cuda_graph=True with a real capture (the other graph tests mock torch.cuda): the first
    call (warm-up), and replays with new inputs, give the eager loop's answer, without a
    warning."""
    import warnings

    dev = torch.device("cuda")
    sched = d2nwg.NoiseSchedule.linear(100)
    net = torch.nn.Linear(16, 16).to(dev)

    def model(x, t, cond):
        return net(x) * 0.1 + t.view(-1, 1).float() * 1e-3

    for sampler in ("ddpm", "dpmpp_2m"):
        for seed in (0, 1, 2):
            x_T = torch.randn(4, 16, device=dev, generator=torch.Generator(dev).manual_seed(seed))
            kw = dict(sampler=sampler, steps=10)
            gens = [torch.Generator(dev).manual_seed(10 + i) for i in range(4)]
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                y = d2nwg.sample(model, x_T, sched, generator=gens, cuda_graph=True, **kw)
            gens = [torch.Generator(dev).manual_seed(10 + i) for i in range(4)]
            want = d2nwg.sample(model, x_T, sched, generator=gens, **kw)
            torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
