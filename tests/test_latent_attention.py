"""latent_attention: triton (interpreter on CPU) and torch backends vs a float64 reference."""

import pytest
import torch

from d2nwg.errors import BackendUnavailableError, ConfigError, D2NWGError, DTypeError, ShapeError
from d2nwg.ops.latent_attention_op import latent_attention, latent_attention_ref
from d2nwg.testing import assert_close_lowp, max_abs_err

BACKENDS = ["triton", "torch"]


def _inputs(gen, B, H, LQ, LK, D, dtype, device, masked):
    q = torch.randn(B, H, LQ, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, H, LK, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, H, LK, D, generator=gen).to(device=device, dtype=dtype)
    do = torch.randn(B, H, LQ, D, generator=gen).to(device=device, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(B, LK, generator=gen) < 0.7
        mask[:, 0] = True  # keep at least one key per row (fully masked rows tested below)
        mask = mask.to(device)
    return q, k, v, do, mask


def _fwd_bwd(fn, q, k, v, do, mask, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out.detach(), *grads)


def _ref64(q, k, v, do, mask):
    return _fwd_bwd(latent_attention_ref, q.double(), k.double(), v.double(), do.double(), mask)


CASES = [  # B, H, Lq, Lk, D, masked
    (2, 2, 37, 53, 32, True),  # cross, odd lengths, two blocks each
    (1, 2, 53, 53, 16, True),  # self
    (2, 1, 1, 129, 64, True),  # one query, three key blocks
    (2, 1, 129, 1, 16, False),  # one key
    (1, 2, 64, 96, 32, False),  # block multiples: the kernels' unchecked fast paths
    (2, 1, 64, 64, 16, True),  # block multiples with a mask
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("m" if c[5] else "")
)
def test_fp32_matches_float64_reference(backend, case, gen, device):
    q, k, v, do, mask = _inputs(gen, *case[:5], torch.float32, device, case[5])
    got = _fwd_bwd(latent_attention, q, k, v, do, mask, backend=backend)
    ref = _ref64(q, k, v, do, mask)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        scale = b.abs().max().item() + 1e-6
        assert max_abs_err(a, b) <= 1e-5 + 1e-4 * scale, (name, max_abs_err(a, b))


def test_head_dim_128_triton(gen, device):
    q, k, v, do, mask = _inputs(gen, 1, 1, 33, 40, 128, torch.float32, device, True)
    got = _fwd_bwd(latent_attention, q, k, v, do, mask, backend="triton")
    for a, b in zip(got, _ref64(q, k, v, do, mask)):
        assert max_abs_err(a, b) <= 1e-5 + 1e-4 * b.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_row_gives_zeros_and_finite_grads(backend, gen, device):
    q, k, v, do, mask = _inputs(gen, 2, 2, 19, 21, 16, torch.float32, device, True)
    mask[0] = False
    out, dq, dk, dv = _fwd_bwd(latent_attention, q, k, v, do, mask, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    ref = _ref64(q, k, v, do, mask)
    for a, b in zip((out, dq, dk, dv), ref):
        assert max_abs_err(a, b) <= 1e-5 + 1e-4 * b.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_keys_and_queries(backend, gen, device):
    q = torch.randn(1, 2, 3, 16, generator=gen).to(device).requires_grad_()
    empty = torch.zeros(1, 2, 0, 16, device=device, requires_grad=True)
    out = latent_attention(
        q, empty, empty, torch.zeros(1, 0, dtype=torch.bool, device=device), backend=backend
    )
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))
    assert latent_attention(empty, q, q, backend=backend).shape == (1, 2, 0, 16)


def test_batch_split_into_several_launches(gen, device, monkeypatch):
    """More (batch, head) pairs than a grid dimension holds: one launch per batch slice."""
    from d2nwg.kernels import latent_attention as kern

    monkeypatch.setattr(kern, "MAX_GRID_Y", 4)  # 2 batch elements of 2 heads per launch
    q, k, v, do, mask = _inputs(gen, 5, 2, 9, 11, 16, torch.float32, device, True)
    got = _fwd_bwd(latent_attention, q, k, v, do, mask, backend="triton")
    for a, b in zip(got, _ref64(q, k, v, do, mask)):
        assert max_abs_err(a, b) <= 1e-5 + 1e-4 * b.abs().max().item()


def test_masked_keys_do_not_matter(gen, device):
    q, k, v, do, mask = _inputs(gen, 2, 1, 20, 45, 32, torch.float32, device, True)
    out = latent_attention(q, k, v, mask, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :].expand(-1, 1, -1)] = 1e4
    v2[~mask[:, None, :].expand(-1, 1, -1)] = float("nan")
    out2 = latent_attention(q, k2, v2, mask, backend="triton")
    assert torch.equal(out, out2)


def test_strided_inputs_triton(gen, device):
    """q, k, v as views of one packed projection [B, L, 3, H, D] (the denoiser's layout)."""
    B, L, H, D = 2, 23, 2, 16
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = (
        torch.randn(B, H, L, D, generator=gen)
        .to(device)
        .transpose(2, 3)
        .contiguous()
        .transpose(2, 3)
    )
    got = _fwd_bwd(latent_attention, q, k, v, do, None, backend="triton")
    for a, b in zip(got, _ref64(q, k, v, do, None)):
        assert max_abs_err(a, b) <= 1e-5 + 1e-4 * b.abs().max().item()


# The Triton interpreter computes bf16 tl.dot wrongly; the kernel widens the (bf16-rounded)
# operands there (UPCAST), so bf16 is tested on CPU with the same rounding points as on a GPU.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_pytorch_error(backend, dtype, gen, device):
    q, k, v, do, mask = _inputs(gen, 2, 2, 37, 53, 32, dtype, device, True)
    got = _fwd_bwd(latent_attention, q, k, v, do, mask, backend=backend)
    ref = _ref64(q, k, v, do, mask)
    pt = _fwd_bwd(latent_attention_ref, q, k, v, do, mask)  # plain PyTorch in `dtype`
    for name, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref, pt):
        assert a.dtype == dtype
        assert_close_lowp(a, r, p, name=f"{backend} {name}")


def test_default_backend_on_cpu_is_torch_and_forced_reasons(gen):
    q, k, v, _, mask = _inputs(gen, 1, 1, 5, 7, 24, torch.float32, "cpu", True)
    out = latent_attention(q, k, v, mask)  # head dim 24: only torch can run it
    assert out.shape == (1, 1, 5, 24)
    with pytest.raises(BackendUnavailableError, match="head dim 24"):
        latent_attention(q, k, v, mask, backend="triton")
    with pytest.raises(BackendUnavailableError, match="xformers"):
        latent_attention(q, k, v, mask, backend="xformers")
    with pytest.raises(ConfigError):
        latent_attention(q, k, v, mask, backend="nope")


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "args,err,word",
    [
        ((_t(2, 3, 16), _t(2, 1, 3, 16), _t(2, 1, 3, 16), None), ShapeError, "q"),
        ((_t(2, 1, 3, 16), _t(2, 1, 3, 16, 1), _t(2, 1, 3, 16), None), ShapeError, "k"),
        ((_t(2, 1, 3, 16), _t(3, 1, 4, 16), _t(3, 1, 4, 16), None), ShapeError, "batch"),
        ((_t(2, 1, 3, 16), _t(2, 2, 4, 16), _t(2, 2, 4, 16), None), ShapeError, "heads"),
        ((_t(2, 1, 3, 16), _t(2, 1, 4, 32), _t(2, 1, 4, 32), None), ShapeError, "head dim"),
        ((_t(2, 1, 3, 16), _t(2, 1, 4, 16), _t(2, 1, 5, 16), None), ShapeError, "v has 5"),
        (
            (_t(2, 1, 3, 16), _t(2, 1, 4, 16, dtype=torch.float16), _t(2, 1, 4, 16), None),
            DTypeError,
            "k",
        ),
        ((_t(2, 1, 3, 16, dtype=torch.int32),) * 3 + (None,), DTypeError, "q"),
        ((_t(2, 1, 3, 16), _t(2, 1, 4, 16), _t(2, 1, 4, 16), _t(2, 4)), DTypeError, "mask"),
        (
            (_t(2, 1, 3, 16), _t(2, 1, 4, 16), _t(2, 1, 4, 16), _t(2, 3, dtype=torch.bool)),
            ShapeError,
            "mask",
        ),
        (
            (_t(2, 1, 3, 16), _t(2, 1, 4, 16), _t(2, 1, 4, 16), _t(4, dtype=torch.bool)),
            ShapeError,
            "mask",
        ),
    ],
)
def test_bad_inputs_name_the_argument(args, err, word):
    with pytest.raises(err, match=word) as info:
        latent_attention(*args)
    assert isinstance(info.value, D2NWGError)


def test_batch_offsets_past_int32(gen, device):
    """b * stride_b >= 2^31 while the stride itself fits in int32 (so Triton passes it as
    int32): the kernels must form batch offsets in int64. q is a view whose batch stride is
    just over 2^30 elements, so batch element 2 starts past element 2^31 of its buffer (4 GiB
    of fp16, reserved but only a few pages touched). The launchers are called directly: a
    clone would make q dense."""
    from d2nwg.kernels.latent_attention import attention_bwd, attention_fwd

    B, H, L, D = 3, 1, 16, 16
    stride_b = 2**30 + 256
    try:
        buf = torch.empty(2 * stride_b + H * L * D, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:  # an address space without 4 GiB to reserve
        pytest.skip(f"cannot reserve the 4 GiB buffer: {exc}")
    q = buf.as_strided((B, H, L, D), (stride_b, L * D, D, 1))
    q.copy_(torch.randn(B, H, L, D, generator=gen).to(torch.float16))
    _, k, v, do, mask = _inputs(gen, B, H, L, L, D, torch.float16, device, True)
    scale = D**-0.5
    o, lse = attention_fwd(q, k, v, mask, scale)
    got = (o, *attention_bwd(do, q, k, v, o, lse, mask, scale))
    dense = q.contiguous()
    ref = _ref64(dense, k, v, do, mask)
    pt = _fwd_bwd(latent_attention_ref, dense, k, v, do, mask)
    for name, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref, pt):
        assert_close_lowp(a, r, p, name=name)
