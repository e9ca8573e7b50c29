"""torch.compile traces through every public op on every backend, without a graph break.

``fullgraph=True`` turns any graph break into an error, so each test compiles calls of the
public functions (``backend="aot_eager"``: Dynamo and AOTAutograd, forward and backward, with
the ops' fake impls; no code generation) and checks the compiled result against eager: bit-equal
for tokenize / detokenize and the sampler step (same kernels, same arithmetic), fp32 tolerance
for attention. The Triton backends are torch.library custom ops (the launchers cannot be
traced); ``opcheck`` checks their schemas, fake impls (shapes and strides) and autograd.
On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (conftest.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from d2nwg import _ext
from d2nwg.backends import triton_reason
from d2nwg.nn.conditioners import Condition
from d2nwg.nn.denoiser import LatentDenoiser, LatentDenoiserConfig
from d2nwg.ops import ChunkPlan, detokenize, latent_attention, sampler_step, sampler_step_
from d2nwg.ops.sampler_step_op import K

# (d2nwg.ops re-exports functions named like these modules: import the modules themselves.)
tokenize_ops = importlib.import_module("d2nwg.ops.tokenize_op")
tokenize = tokenize_ops.tokenize


def compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def backend_device(backend: str, device: torch.device) -> torch.device:
    """Skip (with the reason) a backend that cannot run on this machine's device."""
    if backend == "cpp" and (device.type != "cpu" or _ext.cpp_reason()):
        pytest.skip(f"cpp backend: {_ext.cpp_reason() or 'runs on CPU tensors'}")
    if backend == "cuda" and (device.type != "cuda" or _ext.cuda_reason(0)):
        pytest.skip(f"cuda backend: {_ext.cuda_reason(0) if device.type == 'cuda' else 'no GPU'}")
    if backend == "triton" and triton_reason([torch.empty(0, device=device)]):
        pytest.skip(f"triton backend: {triton_reason([torch.empty(0, device=device)])}")
    return device


# ----------------------------------------------------------------------------------------
# Tokenize and detokenize: bit-equal to eager, destinations (graph inputs) written in place.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_tokenize_detokenize(backend, gen, device):
    dev = backend_device(backend, device)
    # Two models of 3 segments; the last segment spans two tokens with padding.
    plan = ChunkPlan((6, 3, 7), (0, 8, 12), (8, 4, 12), (0.5, 0.0, -1.0), (2.0, 1.0, 0.25), 6, 4)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)  # one Triton launch per dtype
    sources = [
        torch.randn(n, generator=gen).to(dev, dt)
        for _ in range(2)
        for n, dt in zip(plan.numel, dtypes)
    ]

    def round_trip(sources, dests):
        tokens = tokenize([s * 2 for s in sources], plan, backend=backend)
        detokenize(tokens + 1, dests, plan, backend=backend)
        return tokens

    def fresh_dests():  # one non-contiguous destination (detokenize goes through a copy)
        d = [
            torch.zeros(n, device=dev, dtype=dt)
            for _ in range(2)
            for n, dt in zip(plan.numel, dtypes)
        ]
        d[0] = torch.zeros(3, 2, device=dev).t()
        return d

    want_dests, got_dests = fresh_dests(), fresh_dests()
    want = round_trip(sources, want_dests)
    got = compiled(round_trip)(sources, got_dests)
    assert got.dtype == torch.float32 and got.shape == (2, 6, 4)
    assert torch.equal(got, want)
    for g, w in zip(got_dests, want_dests):
        assert g.dtype == w.dtype and torch.equal(g, w)


# ----------------------------------------------------------------------------------------
# Sampler step: out-of-place (guided, noise, previous x0) then in place, plain and with the
# two-step history (DPM-Solver++(3M), UniPC); bit-equal to eager.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_sampler_step(backend, gen, device):
    dev = backend_device(backend, device)
    B, N, S = 3, 37, 5

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dev)

    x, out, z, prev, prev2 = rnd(B, N), rnd(2 * B, N), rnd(B, N), rnd(B, N), rnd(B, N)
    table, shared = rnd(S, B, K), rnd(S, K)  # per-sample and shared coefficients
    step = torch.tensor([3], device=dev)

    def three_steps(x, out, table, shared, step, z, prev, prev2):
        y = sampler_step(x, out, table, step, noise=z, prev_x0=prev, guided=True, backend=backend)
        y = sampler_step_(y, out[:B], shared, step - 1, backend=backend)
        return sampler_step_(
            y, out, shared, step - 2, prev_x0=prev, prev2_x0=prev2, guided=True, backend=backend
        )

    want_hist = (prev.clone(), prev2.clone())
    got_hist = (prev.clone(), prev2.clone())
    want = three_steps(x, out, table, shared, step, z, *want_hist)
    fn = compiled(three_steps)
    got = fn(x, out, table, shared, step, z, *got_hist)
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_hist, want_hist))
    assert not torch.equal(got_hist[0], prev)  # the previous x0 was updated in place
    assert not torch.equal(got_hist[1], prev2)  # and the one before it
    if dev.type == "cpu":  # the eager range check of step becomes an assert in the graph
        with pytest.raises(RuntimeError, match="out of range"):
            fn(x, out, table, shared, torch.tensor([S], device=dev), z, prev.clone(), prev2)


# ----------------------------------------------------------------------------------------
# Latent attention: forward and backward (AOT-traced) against eager, at fp32 tolerance.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_latent_attention_forward_backward(backend, gen, device):
    dev = backend_device(backend, device)
    B, H, LQ, LK, LC, D = 2, 2, 9, 11, 4, 16

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(dev).requires_grad_()

    q, k, v, kc, vc = (
        leaf(B, H, LQ, D),
        leaf(B, H, LK, D),
        leaf(B, H, LK, D),
        leaf(B, H, LC, D),
        leaf(B, H, LC, D),
    )
    mask = torch.ones(B, LK, dtype=torch.bool, device=dev)
    mask[1, 6:] = False
    w1, w2 = (torch.randn(B, H, LQ, D, generator=gen).to(dev) for _ in range(2))

    def attend(q, k, v, mask, kc, vc):  # masked self-attention, then unmasked cross-attention
        o = latent_attention(q, k, v, mask, backend=backend)
        return o, latent_attention(o, kc, vc, scale=0.3, backend=backend)

    def fwd_bwd(fn):
        leaves = (q, k, v, kc, vc)
        o1, o2 = fn(q, k, v, mask, kc, vc)
        grads = torch.autograd.grad((o1 * w1).sum() + (o2 * w2).sum(), leaves)
        return (o1, o2) + grads

    for got, want in zip(fwd_bwd(compiled(attend)), fwd_bwd(attend)):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()


# ----------------------------------------------------------------------------------------
# The denoiser (self- and cross-attention, masks, layer kinds), forward and backward.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_denoiser_forward_backward(backend, gen, device):
    dev = backend_device(backend, device)
    cfg = LatentDenoiserConfig(
        latent_dim=8,
        hidden_dim=32,
        depth=1,
        num_heads=2,
        cond_dim=8,
        num_layer_kinds=3,
        max_cond_slots=4,
        timestep_freq_dim=16,
    )
    den = LatentDenoiser(cfg, seed=0).to(dev)
    with torch.no_grad():  # off the adaLN-Zero init, so that every parameter gets a gradient
        for p in den.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(dev) * 0.1)
    den.attention_backend = backend
    B, T = 2, 7
    x = torch.randn(B, T, 8, generator=gen).to(dev)
    t = torch.tensor([3, 700], device=dev)
    cond = Condition(
        torch.randn(B, 3, 8, generator=gen).to(dev),
        torch.randn(B, 8, generator=gen).to(dev),
        torch.tensor([[True, True, True], [True, False, False]], device=dev),
    )
    kinds = torch.tensor([0, 1, 2, 1, 0, 2, 2], device=dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    mask[0, 5:] = False

    def fwd_bwd(model):
        y = model(x, t, cond, layer_kinds=kinds, mask=mask)
        params = [p for name, p in den.named_parameters() if not name.startswith("null.")]
        return (y,) + torch.autograd.grad(y.square().sum(), params)  # the null condition: unused

    for got, want in zip(fwd_bwd(compiled(den)), fwd_bwd(den)):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------
# The Triton custom ops themselves: schema, fake impl (shapes and strides), autograd.
# ----------------------------------------------------------------------------------------
def test_triton_custom_ops_opcheck(gen, device):
    dev = backend_device("triton", device)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    plan = ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, 1.0), (2.0, 1.0), 3, 4)
    plan_args = tokenize_ops._plan_args(plan)
    q, k, v = rnd(2, 2, 5, 16), rnd(2, 2, 7, 16), rnd(2, 2, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4], device=dev)
    o, lse = torch.ops.d2nwg.attention_fwd_triton(q, k, v, mask, 0.25)
    ops = torch.ops.d2nwg
    cases = [
        (
            ops.tokenize_triton_,
            (torch.empty(1, 12, device=dev), [rnd(5), rnd(3, dtype=torch.bfloat16)], *plan_args),
        ),
        (
            ops.detokenize_triton_,
            (
                rnd(1, 12),
                [torch.empty(5, device=dev), torch.empty(3, device=dev, dtype=torch.float16)],
                *plan_args,
            ),
        ),
        (
            ops.sampler_step_triton_,
            (
                rnd(2, 7),
                rnd(4, 7),
                rnd(5, K),
                torch.tensor([2], device=dev),
                rnd(2, 7),
                rnd(2, 7),
                True,
            ),
        ),
        (  # with the second history buffer
            ops.sampler_step_triton_,
            (
                rnd(2, 7),
                rnd(2, 7),
                rnd(5, K),
                torch.tensor([1], device=dev),
                None,
                rnd(2, 7),
                False,
                rnd(2, 7),
            ),
        ),
        (
            ops.attention_fwd_triton,
            (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, 0.25),
        ),
        (
            ops.attention_bwd_triton,
            (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, mask, 0.25),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)
