"""The fused sampler step: every backend that runs here against the PyTorch reference."""

import re
from pathlib import Path

import pytest
import torch

from d2nwg import _ext
from d2nwg.errors import (
    BackendUnavailableError,
    ConfigError,
    D2NWGError,
    DeviceError,
    DTypeError,
    ShapeError,
)
from d2nwg.ops import sampler_step_op as step_op
from d2nwg.ops.sampler_step_op import COLUMNS, K, sampler_step, sampler_step_, sampler_step_ref

BACKENDS = ["torch", "triton", "cpp", "cuda"]


def _skip_unavailable(backend, device):
    if backend == "cuda" and device.type != "cuda":
        pytest.skip("cuda backend needs a GPU")
    if backend == "cpp" and device.type != "cpu":
        pytest.skip("cpp backend runs on CPU tensors")
    if backend == "cpp" and _ext.cpp_reason() is not None:
        pytest.fail(f"the cpp backend must be built for these tests: {_ext.cpp_reason()}")


def _inputs(
    B,
    N,
    *,
    guided,
    noise,
    prev,
    per_sample,
    prev2=False,
    S=5,
    dtype=torch.float32,
    table_dtype=torch.float32,
    gen,
    device,
):
    """(x, out, table, step, noise, prev_x0, prev2_x0); prev2 (the second history buffer)
    comes with prev."""

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dt)

    x = rnd(B, N)
    out = rnd(2 * B if guided else B, N)
    table = rnd(*((S, B, K) if per_sample else (S, K)), dt=table_dtype)
    step = torch.randint(0, S, (1,), generator=gen).to(device)
    z = rnd(B, N) if noise else None
    p = rnd(B, N) if prev or prev2 else None
    p2 = rnd(B, N) if prev2 else None
    return x, out, table, step, z, p, p2


def _copy(t):
    return t.clone() if t is not None else None


def _run(backend, x, out, table, step, z, p, p2, guided):
    """(next x, updated prev, updated prev2) of one backend, inputs untouched."""
    p, p2 = _copy(p), _copy(p2)
    y = sampler_step(
        x, out, table, step, noise=z, prev_x0=p, prev2_x0=p2, guided=guided, backend=backend
    )
    return y, p, p2


def _ref(x, out, table, step, z, p, p2, guided, compute_dtype=None):
    y, p, p2 = x.clone(), _copy(p), _copy(p2)
    sampler_step_ref(y, out, table, step, z, p, guided, p2, compute_dtype=compute_dtype)
    return y, p, p2


SHAPES = [(3, 37), (1, 1), (5, 1), (2, 1025), (4, 300)]
FLAGS = [  # guided, noise, prev, per_sample, prev2
    (False, False, False, False, False),
    (True, False, False, False, False),
    (False, True, False, False, False),
    (False, False, True, False, False),
    (True, True, True, True, False),
    (False, True, True, True, False),
    (False, False, True, False, True),  # DPM-Solver++(3M), UniPC
    (True, False, True, True, True),
    (True, True, True, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flags", FLAGS)
def test_fp32_matches_reference(backend, shape, flags, gen, device):
    _skip_unavailable(backend, device)
    guided, noise, prev, per_sample, prev2 = flags
    args = _inputs(
        *shape,
        guided=guided,
        noise=noise,
        prev=prev,
        per_sample=per_sample,
        prev2=prev2,
        gen=gen,
        device=device,
    )
    got = _run(backend, *args, guided)
    want = _ref(*args, guided)
    scale = max(1.0, float(want[0].abs().max()))
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * scale)
    if prev2:  # moved, not recomputed: bit-equal to the old prev
        assert torch.equal(got[2], args[5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_and_fp64_table(backend, gen, device):
    _skip_unavailable(backend, device)
    args = _inputs(
        3,
        130,
        guided=True,
        noise=True,
        prev=True,
        per_sample=False,
        prev2=True,
        dtype=torch.float64,
        table_dtype=torch.float64,
        gen=gen,
        device=device,
    )
    for got, want in zip(_run(backend, *args, True), _ref(*args, True)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # float32 x with a float64 table: coefficients rounded to float32 first, as the reference
    args32 = _inputs(
        3,
        130,
        guided=False,
        noise=True,
        prev=False,
        per_sample=True,
        table_dtype=torch.float64,
        gen=gen,
        device=device,
    )
    torch.testing.assert_close(
        _run(backend, *args32, False)[0], _ref(*args32, False)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(backend, dtype, gen, device):
    """Error vs a float64 reference at most twice PyTorch's own error computing in dtype."""
    _skip_unavailable(backend, device)
    args = _inputs(
        4,
        257,
        guided=True,
        noise=True,
        prev=True,
        per_sample=False,
        prev2=True,
        dtype=dtype,
        gen=gen,
        device=device,
    )
    table = args[2]
    hi = [
        t.double() if t is not None and t.is_floating_point() and t is not table else t
        for t in args
    ]
    refs = _ref(*hi, True)  # x, prev, prev2 in float64
    mine = _run(backend, *args, True)
    owns = _ref(*args, True, compute_dtype=dtype)  # PyTorch's own, in dtype
    for got, own, ref in zip(mine, owns, refs):
        err = (got.double() - ref).abs().max().item()
        own_err = (own.double() - ref).abs().max().item()
        assert err <= 2 * own_err + 1e-12, (err, own_err)
    assert torch.equal(mine[2], args[5])  # prev2 <- prev, bit for bit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", [0, 1])
def test_vector_widths_and_unaligned_storage(backend, dtype, offset, gen, device):
    """N a multiple of every vector width (16 bytes per access: 4 fp32, 8 fp16/bf16, 2 fp64)
    on 16-byte aligned storage (the CUDA kernel's wide path) and on storage one element off
    (its scalar path), in place, guided, with noise, the two previous x0 and a per-sample
    table."""
    _skip_unavailable(backend, device)
    args = _inputs(
        3,
        512,
        guided=True,
        noise=True,
        prev=True,
        per_sample=True,
        prev2=True,
        dtype=dtype,
        gen=gen,
        device=device,
    )
    y_ref, p_ref, p2_ref = _ref(*args, True)

    def placed(t):  # a contiguous copy of t starting `offset` elements into its storage
        buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
        return buf[offset:].view(t.shape).copy_(t)

    x, out, table, step, z, p, p2 = args
    x, out, z, p, p2 = placed(x), placed(out), placed(z), placed(p), placed(p2)
    assert (x.data_ptr() % 16 == 0) == (offset == 0)
    sampler_step_(
        x, out, table, step, noise=z, prev_x0=p, prev2_x0=p2, guided=True, backend=backend
    )
    assert torch.equal(p2, p2_ref)
    for got, want in ((x, y_ref), (p, p_ref)):
        scale = max(1.0, float(want.abs().max()))
        tol = (
            1e-5
            if dtype == torch.float32
            else 1e-12
            if dtype == torch.float64
            else 2 * torch.finfo(dtype).eps
        )  # two ulps: an FMA may flip the final rounding
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_index_is_read_from_the_tensor(backend, gen, device):
    """Each row of the table is used at its step, shared and per-sample tables alike."""
    _skip_unavailable(backend, device)
    x, out, table, _, z, p, p2 = _inputs(
        2,
        33,
        guided=False,
        noise=True,
        prev=True,
        per_sample=True,
        prev2=True,
        S=4,
        gen=gen,
        device=device,
    )
    for s in range(4):
        step = torch.tensor([s], device=device)
        y, *_ = _run(backend, x, out, table, step, z, p, p2, False)
        y_ref, *_ = _ref(x, out, table, step, z, p, p2, False)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        one = table[s : s + 1]  # the same row as a 1-step table
        y1, *_ = _run(
            backend, x, out, one, torch.zeros(1, dtype=torch.long, device=device), z, p, p2, False
        )
        torch.testing.assert_close(y1, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_and_prev_buffer(backend, gen, device):
    _skip_unavailable(backend, device)
    x, out, table, step, z, p, p2 = _inputs(
        3,
        50,
        guided=False,
        noise=False,
        prev=True,
        per_sample=False,
        prev2=True,
        gen=gen,
        device=device,
    )
    y_ref, p_ref, _ = _ref(x, out, table, step, None, p, None, False)
    x_in, p_in = x.clone(), p.clone()
    ret = sampler_step_(x_in, out, table, step, prev_x0=p_in, backend=backend)
    assert ret is x_in
    torch.testing.assert_close(x_in, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_in, p_ref, rtol=1e-5, atol=1e-5)
    # two history buffers: x and both buffers in place, the older one takes prev's values
    y_ref, p_ref, _ = _ref(x, out, table, step, None, p, p2, False)
    x_in, p_in, p2_in = x.clone(), p.clone(), p2.clone()
    ret = sampler_step_(x_in, out, table, step, prev_x0=p_in, prev2_x0=p2_in, backend=backend)
    assert ret is x_in and torch.equal(p2_in, p)
    torch.testing.assert_close(x_in, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_in, p_ref, rtol=1e-5, atol=1e-5)
    x2 = x.clone()
    sampler_step(x2, out, table, step, backend=backend)  # out of place
    assert torch.equal(x2, x)


def test_hand_computed_coefficients(device):
    """The documented formula on one element, every column non-zero."""
    # G, AX, AO, EX, EO, CX, C0, CE, CP, CZ, CP2
    row = [1.5, 0.3, -0.2, 0.1, 0.9, 0.7, 0.4, 0.25, -0.5, 0.05, 0.125]
    c = torch.tensor([row], dtype=torch.float64)
    x = torch.tensor([[2.0]], dtype=torch.float64, device=device)
    out = torch.tensor([[1.0], [-1.0]], dtype=torch.float64, device=device)  # cond, uncond
    z = torch.tensor([[0.5]], dtype=torch.float64, device=device)
    o = -1.0 + 1.5 * (1.0 - -1.0)
    x0 = 0.3 * 2 - 0.2 * o
    eps = 0.1 * 2 + 0.9 * o
    step = torch.zeros(1, dtype=torch.long, device=device)
    for history in (1, 2):  # DPM-Solver++(2M)'s one buffer; (3M) and UniPC's two
        p = torch.tensor([[3.0]], dtype=torch.float64, device=device)
        p2 = torch.tensor([[-4.0]], dtype=torch.float64, device=device) if history == 2 else None
        want = 0.7 * 2 + 0.4 * x0 + 0.25 * eps - 0.5 * 3.0 + 0.05 * 0.5
        if history == 2:
            want += 0.125 * -4.0
        y = sampler_step(
            x,
            out,
            c.to(device),
            step,
            noise=z,
            prev_x0=p,
            prev2_x0=p2,
            guided=True,
            backend="torch",
        )
        assert abs(y.item() - want) < 1e-12 and abs(p.item() - x0) < 1e-12
        assert p2 is None or p2.item() == 3.0  # the history moved back one step


def test_empty_and_dispatch(device):
    x = torch.zeros(2, 0, device=device)
    table = torch.zeros(1, K, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    assert sampler_step(x, torch.zeros(2, 0, device=device), table, step).shape == (2, 0)
    with pytest.raises(ConfigError, match="backend"):
        sampler_step(
            torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, K), step.cpu(), backend="nope"
        )
    if device.type == "cpu":
        with pytest.raises(BackendUnavailableError, match="cuda"):
            sampler_step(
                torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, K), step.cpu(), backend="cuda"
            )


def test_bad_input_names_the_argument():
    x, out, table = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, K)
    step = torch.zeros(1, dtype=torch.long)
    cases = [
        (dict(x=torch.zeros(6)), ShapeError, "x"),
        (
            dict(
                x=torch.zeros(2, 3, dtype=torch.int32),
                model_out=torch.zeros(2, 3, dtype=torch.int32),
            ),
            DTypeError,
            "x",
        ),
        (dict(model_out=torch.zeros(3, 3)), ShapeError, "model_out"),
        (dict(model_out=torch.zeros(2, 3), guided=True), ShapeError, "model_out"),
        (dict(model_out=torch.zeros(2, 3, dtype=torch.float64)), DTypeError, "model_out"),
        (dict(table=torch.zeros(4, K - 1)), ShapeError, "table"),
        (dict(table=torch.zeros(4, 3, K)), ShapeError, "table"),
        (dict(table=torch.zeros(4, K, dtype=torch.float16)), DTypeError, "table"),
        (dict(step=torch.zeros(1)), DTypeError, "step"),
        (dict(step=torch.zeros(2, dtype=torch.long)), ShapeError, "step"),  # a count, not a dtype
        (dict(step=torch.tensor([4])), ShapeError, "step"),
        (dict(noise=torch.zeros(2, 4)), ShapeError, "noise"),
        (dict(prev_x0=torch.zeros(2, 3, dtype=torch.float64)), DTypeError, "prev_x0"),
        (dict(prev2_x0=torch.zeros(2, 3)), ShapeError, "prev2_x0 needs prev_x0"),
        (dict(prev_x0=torch.zeros(2, 3), prev2_x0=torch.zeros(3, 3)), ShapeError, "prev2_x0"),
        (
            dict(prev_x0=torch.zeros(2, 3), prev2_x0=torch.zeros(2, 3, dtype=torch.float64)),
            DTypeError,
            "prev2_x0",
        ),
        (dict(prev_x0=(p := torch.zeros(2, 3)), prev2_x0=p), ShapeError, "different buffers"),
        (dict(prev_x0=p, prev2_x0=p.view(3, 2).view(2, 3)), ShapeError, "different buffers"),
        (
            dict(prev_x0=torch.zeros(2, 3), prev2_x0=torch.zeros(3, 2).t()),
            ShapeError,
            "prev2_x0 must be contiguous",
        ),
        (dict(table=torch.zeros(4, K, device="meta")), DeviceError, "table"),
    ]
    for change, exc, name in cases:
        kw = dict(
            x=x,
            model_out=out,
            table=table,
            step=step,
            noise=None,
            prev_x0=None,
            prev2_x0=None,
            guided=False,
        )
        kw.update(change)
        with pytest.raises(exc, match=name) as info:
            sampler_step(kw.pop("x"), kw.pop("model_out"), kw.pop("table"), kw.pop("step"), **kw)
        assert isinstance(info.value, D2NWGError)


def test_column_layout_agrees_with_the_csrc_header():
    """csrc/sampler_step_layout.h and d2nwg.ops.sampler_step_op name the same columns at the same
    indices (the Triton kernel gets the Python ones as constexprs)."""
    header = Path(__file__).resolve().parents[1] / "csrc" / "sampler_step_layout.h"
    found = dict(re.findall(r"constexpr int k(\w+) = (\d+);", header.read_text()))
    assert {name: int(v) for name, v in found.items()} == {
        **{name: j for j, name in enumerate(COLUMNS)},
        "K": K,
    }
    for j, name in enumerate(COLUMNS):
        assert getattr(step_op, name) == j


@pytest.mark.parametrize("B, N, block", [(5, 13, 8), (5, 3, 8), (7, 5, 16), (3, 37, 32)])
def test_triton_gpu_tiling_on_cpu(B, N, block, gen, monkeypatch):
    """The Triton kernel with GPU-like tiles on CPU (the interpreter's default is one program
    per launch): several row tiles and column tiles, partial ones at both edges, per-sample
    coefficients, so that a swapped or mis-strided row / column index changes the result."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    from d2nwg.kernels import sampler_step as kernel_mod

    monkeypatch.setattr(kernel_mod, "INTERPRET_BLOCK", block)
    block_b, block_n = kernel_mod.tile(B, N, True)
    assert block_b * block_n <= block and (block_b < B or block_n < N)
    for guided, noise, prev, prev2 in [
        (True, True, True, False),
        (False, False, True, False),
        (False, True, False, False),
        (True, False, True, True),
    ]:
        args = _inputs(
            B,
            N,
            guided=guided,
            noise=noise,
            prev=prev,
            per_sample=True,
            prev2=prev2,
            gen=gen,
            device=torch.device("cpu"),
        )
        for got, want in zip(_run("triton", *args, guided), _ref(*args, guided)):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
