"""Fused chunk tokenization ops: every backend bit-exact against tokenize_ref/detokenize_ref.

Backends that cannot run here are skipped with their reason (cuda without a GPU); the Triton
kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it when no GPU is visible).
Plans are built directly (no WeightTokenizer), with odd sizes on purpose: empty and
one-element segments, segments shorter than a chunk, chunk sizes that are not powers of two.
"""

from __future__ import annotations

import pytest
import torch

import d2nwg
from d2nwg import _ext
from d2nwg.backends import select, triton_reason
from d2nwg.ops.tokenize_op import (
    DETOKENIZE_BACKENDS,
    TOKENIZE_BACKENDS,
    ChunkPlan,
    detokenize,
    detokenize_ref,
    tokenize,
    tokenize_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BACKENDS = ["torch", "cpp", "triton", "cuda"]
HAS_CUDA = torch.cuda.is_available()


def backend_device(backend: str) -> torch.device:
    """Where a backend runs in this test session; skips with the reason when it cannot."""
    if backend == "cuda":
        if not HAS_CUDA:
            pytest.skip("cuda backend: no CUDA device on this machine")
        reason = _ext.cuda_reason(0)
        if reason:
            pytest.skip(f"cuda backend: {reason}")
        return torch.device("cuda")
    if backend == "triton":
        device = torch.device("cuda" if HAS_CUDA else "cpu")
        reason = triton_reason([torch.empty(0, device=device)])
        if reason:
            pytest.skip(f"triton backend: {reason}")
        return device
    if backend == "cpp" and _ext.cpp_reason():
        pytest.skip(f"cpp backend: {_ext.cpp_reason()}")
    return torch.device("cpu")


def make_plan(
    numels: list[int], chunk_size: int, granularity: str, normalize: bool, gen: torch.Generator
) -> ChunkPlan:
    """Layer granularity: spans = ceil(numel/C)*C. Model: spans = numel, the last segment
    carries the tail padding."""
    C = chunk_size
    if granularity == "layer":
        spans = [-(-n // C) * C for n in numels]
    else:
        spans = list(numels)
        spans[-1] += -sum(numels) % C
    offsets = [sum(spans[:i]) for i in range(len(spans))]
    S = len(numels)
    if normalize:
        mean = (torch.randn(S, generator=gen, dtype=torch.float64) * 0.1).tolist()
        std = (torch.rand(S, generator=gen, dtype=torch.float64) * 2 + 0.05).tolist()
    else:
        mean, std = [0.0] * S, [1.0] * S
    return ChunkPlan(
        tuple(numels), tuple(offsets), tuple(spans), tuple(mean), tuple(std), sum(spans) // C, C
    )


def odd_numels(gen: torch.Generator, chunk_size: int, count: int = 7) -> list[int]:
    """Empty, one-element, shorter-than-a-chunk and multi-chunk segments, shuffled."""
    fixed = [0, 1, max(chunk_size - 1, 1), chunk_size, 2 * chunk_size + 3]
    extra = torch.randint(0, 5 * chunk_size + 2, (count,), generator=gen).tolist()
    numels = fixed + extra
    order = torch.randperm(len(numels), generator=gen).tolist()
    return [numels[i] for i in order]


def random_sources(
    plan: ChunkPlan, num_models: int, gen: torch.Generator, dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """N*S tensors, model-major, with dtypes drawn from `dtypes` (mixed within one call)."""
    out = []
    for _n in range(num_models):
        for s, numel in enumerate(plan.numel):
            dtype = dtypes[int(torch.randint(len(dtypes), (1,), generator=gen))]
            x = (
                torch.randn(numel, generator=gen, dtype=torch.float64) * plan.scale[s] * 3
                + plan.shift[s]
            )
            out.append(x.to(dtype))
    return out


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


# ----------------------------------------------------------------------------------------
# Against the reference.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 100, 16])
def test_tokenize_matches_reference(backend, granularity, normalize, chunk_size, gen):
    device = backend_device(backend)
    plan = make_plan(odd_numels(gen, chunk_size), chunk_size, granularity, normalize, gen)
    sources = random_sources(plan, 3, gen, DTYPES)
    for token_dtype in DTYPES:
        ref = torch.empty(3, plan.num_tokens, plan.chunk_size, dtype=token_dtype)
        tokenize_ref(ref.view(3, -1), sources, plan)
        # NaN-filled output: an element the kernel does not write would show.
        out = nan_like(ref).to(device)
        got = tokenize([s.to(device) for s in sources], plan, out=out, backend=backend)
        assert got is out
        assert torch.equal(got.cpu(), ref), f"{backend}: tokens differ for {token_dtype}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 100])
def test_detokenize_matches_reference(backend, granularity, normalize, chunk_size, gen):
    device = backend_device(backend)
    plan = make_plan(odd_numels(gen, chunk_size), chunk_size, granularity, normalize, gen)
    shapes = random_sources(plan, 2, gen, DTYPES)  # dtypes of the destinations, mixed
    for token_dtype in DTYPES:
        tokens = torch.randn(
            2, plan.num_tokens, plan.chunk_size, generator=gen, dtype=torch.float64
        ).to(token_dtype)
        ref = [nan_like(t) for t in shapes]
        detokenize_ref(tokens.view(2, -1), ref, plan)
        got = [nan_like(t).to(device) for t in shapes]
        detokenize(tokens.to(device), got, plan, backend=backend)
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.dtype == r.dtype
            assert torch.equal(g.cpu(), r), f"{backend}: dests[{i}] differ ({token_dtype} tokens)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_each_dtype_pair(backend, source_dtype, gen):
    """Every (source dtype, token dtype) pair alone, one model, normalized, C = 5."""
    device = backend_device(backend)
    plan = make_plan([1, 13, 0, 40], 5, "layer", True, gen)
    sources = random_sources(plan, 1, gen, [source_dtype])
    for token_dtype in DTYPES:
        ref = torch.empty(1, plan.num_tokens, 5, dtype=token_dtype)
        tokenize_ref(ref.view(1, -1), sources, plan)
        got = tokenize([s.to(device) for s in sources], plan, dtype=token_dtype, backend=backend)
        assert torch.equal(got.cpu(), ref)
        back_ref = [nan_like(s) for s in sources]
        detokenize_ref(ref.view(1, -1), back_ref, plan)
        back = [nan_like(s).to(device) for s in sources]
        detokenize(got, back, plan, backend=backend)
        assert all(torch.equal(b.cpu(), r) for b, r in zip(back, back_ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", [1.0, 0.25, 0.3])
def test_negative_zero_round_trips(backend, std, gen):
    """-0.0 weights of an unshifted layer come back as -0.0 (y * std + 0.0 would give +0.0)."""
    device = backend_device(backend)
    plan = ChunkPlan((6,), (0,), (8,), (0.0,), (std,), 2, 4)
    for dtype in DTYPES:
        x = torch.tensor([-0.0, 0.0, -0.0, 1.5, -2.0, -0.0], dtype=dtype, device=device)
        tokens = tokenize([x], plan, backend=backend)
        back = torch.full_like(x, float("nan"))
        detokenize(tokens, [back], plan, backend=backend)
        zeros = x == 0
        assert bool((back[zeros] == 0).all()), dtype
        assert torch.equal(torch.signbit(back.cpu()), torch.signbit(x.cpu())), dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_mean_of_either_sign(backend, gen):
    """A plan's mean of -0.0 acts as +0.0: -0.0 weights keep their sign through the round
    trip, and a plan equal to one seen before (-0.0 == 0.0, so caches keyed by plan hit) gives
    the same tokens. Before, the Triton launcher reused the -0.0 plan's cached tables for the
    +0.0 plan (and x - (-0.0) turned -0.0 weights into +0.0)."""
    device = backend_device(backend)
    x = torch.tensor([-0.0, 0.0, -0.0, 1.5, -2.0, -0.0], dtype=torch.float64)
    for mean in (-0.0, 0.0, -0.0):
        plan = ChunkPlan((6,), (0,), (8,), (mean,), (0.5,), 2, 4)
        assert not torch.signbit(torch.tensor(plan.shift)).any()
        for dtype in DTYPES:
            src = x.to(dtype)
            ref = torch.empty(1, 2, 4, dtype=torch.float32)
            tokenize_ref(ref.view(1, -1), [src], plan)
            got = tokenize([src.to(device)], plan, backend=backend)
            assert torch.equal(got.cpu().view(torch.int32), ref.view(torch.int32)), (mean, dtype)
            back = torch.full_like(src, float("nan"), device=device)
            detokenize(got, [back], plan, backend=backend)
            assert torch.equal(torch.signbit(back.cpu()), torch.signbit(src)), (mean, dtype)


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_compiled_ops_shift_by_signed_zeros_exactly(backend, gen):
    """The compiled ops subtract / add the mean they are given, either zero: -0.0 - (-0.0) and
    -0.0 + 0.0 are +0.0. (The cpp float32 path for power-of-two scales skipped every zero
    shift, giving -0.0 there.)"""
    device = backend_device(backend)
    x = torch.tensor([-0.0, 0.0, -0.0, 1.5, -2.0, -0.0], dtype=torch.float64)
    for dtype in DTYPES:
        for mean in (-0.0, 0.0):
            src = x.to(dtype)
            out = torch.full((1, 8), float("nan"), device=device)
            torch.ops.d2nwg.tokenize_(out, [src.to(device)], [0], [8], [mean], [2.0])
            want = ((src.double() - mean) * 2.0).float()
            assert torch.equal(out[0, :6].cpu().view(torch.int32), want.view(torch.int32)), (
                mean,
                dtype,
            )
            tokens = src.float().view(1, 6).to(device)
            back = torch.full((6,), float("nan"), dtype=dtype, device=device)
            torch.ops.d2nwg.detokenize_(tokens, [back], [0], [mean], [2.0])
            want = (src.float().double() * 2.0 + mean).float().to(dtype)
            assert torch.equal(torch.signbit(back.cpu()), torch.signbit(want)), (mean, dtype)
            assert torch.equal(back.cpu(), want), (mean, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # on purpose
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_power_of_two_scales_match_reference(backend, source_dtype, gen):
    """Scale-only segments (WeightTokenizer's uncentered layers; the cpp backend computes them
    in float32) give the reference's float64 bits, over the whole float range: subnormal
    results, overflow to inf, signed zeros."""
    device = backend_device(backend)
    base = make_plan([1, 13, 0, 40, 64], 5, "layer", False, gen)
    plan = ChunkPlan(
        base.numel,
        base.offset,
        base.span,
        (0.0,) * 5,
        (2.0**-20, 2.0**3, 1.0, 2.0**-7, 2.0**60),
        base.num_tokens,
        5,
    )
    sources = []
    for numel in plan.numel:
        magnitude = torch.exp2(torch.randint(-149, 128, (numel,), generator=gen).double())
        x = torch.randn(numel, generator=gen, dtype=torch.float64) * magnitude
        x[:2] = torch.tensor([0.0, -0.0], dtype=torch.float64)[: min(2, numel)]
        sources.append(x.to(source_dtype))
    for token_dtype in DTYPES:
        ref = torch.empty(1, plan.num_tokens, 5, dtype=token_dtype)
        tokenize_ref(ref.view(1, -1), sources, plan)
        got = tokenize([s.to(device) for s in sources], plan, dtype=token_dtype, backend=backend)
        assert torch.equal(got.cpu().view(torch.uint8), ref.view(torch.uint8)), token_dtype
        back_ref = [nan_like(s) for s in sources]
        detokenize_ref(ref.view(1, -1), back_ref, plan)
        back = [nan_like(s).to(device) for s in sources]
        detokenize(got, back, plan, backend=backend)
        for b, r in zip(back, back_ref):
            assert torch.equal(b.cpu().view(torch.uint8), r.view(torch.uint8)), token_dtype


# ----------------------------------------------------------------------------------------
# Round trips, padding, layouts of the tensors.
# ----------------------------------------------------------------------------------------
def lossless_token_dtypes(source: torch.dtype) -> list[torch.dtype]:
    """Token dtypes that hold every value of `source` exactly."""
    wider = [torch.float64] if source == torch.float64 else [torch.float32, torch.float64]
    return sorted({source, *wider}, key=str)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_round_trip_bit_exact_without_normalization(backend, granularity, source_dtype, gen):
    device = backend_device(backend)
    plan = make_plan(odd_numels(gen, 7, count=3), 7, granularity, False, gen)
    sources = [s.to(device) for s in random_sources(plan, 2, gen, [source_dtype])]
    for token_dtype in lossless_token_dtypes(source_dtype):
        tokens = tokenize(sources, plan, dtype=token_dtype, backend=backend)
        back = [nan_like(s) for s in sources]
        detokenize(tokens, back, plan, backend=backend)
        for s, b in zip(sources, back):
            assert torch.equal(s, b), f"{backend}: round trip through {token_dtype} not exact"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_padding_is_positive_zero(backend, granularity, gen):
    device = backend_device(backend)
    plan = make_plan([3, 0, 1, 9, 2], 4, granularity, True, gen)  # mean != 0: padding is not x
    sources = [s.to(device) for s in random_sources(plan, 2, gen, DTYPES)]
    mask = torch.zeros(plan.row_size, dtype=torch.bool)
    for o, n in zip(plan.offset, plan.numel):
        mask[o : o + n] = True
    for token_dtype in DTYPES:
        out = (
            tokenize(
                sources,
                plan,
                out=torch.full(
                    (2, plan.num_tokens, 4), float("nan"), dtype=token_dtype, device=device
                ),
                backend=backend,
            )
            .cpu()
            .view(2, -1)
        )
        pad = out[:, ~mask]
        assert pad.numel() > 0
        assert torch.equal(pad, torch.zeros_like(pad))
        assert not torch.signbit(pad).any()
        assert not out[:, mask].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_misaligned_tensors(backend, gen):
    """Transposed sources and destinations, and contiguous tensors at odd storage offsets."""
    device = backend_device(backend)
    plan = make_plan([12, 35, 1, 6], 8, "model", True, gen)
    a = torch.randn(6, 2, generator=gen).t()  # [2, 6], non-contiguous
    b = torch.randn(7, 5, generator=gen, dtype=torch.float64).to(torch.bfloat16).t()
    c = torch.randn(9, generator=gen).half()[3:4]  # offset 3 * 2 bytes
    d = torch.randn(12, generator=gen)[::2]  # strided
    sources = [t.to(device) for t in (a, b, c, d)]
    ref = torch.empty(1, plan.num_tokens, 8)
    tokenize_ref(ref.view(1, -1), [a, b, c, d], plan)
    assert torch.equal(tokenize(sources, plan, backend=backend).cpu(), ref)

    dests = [
        torch.empty(6, 2, device=device).t(),
        torch.empty(7, 5, device=device).t().to(torch.bfloat16),
        torch.empty(9, device=device, dtype=torch.float16)[3:4],
        torch.empty(12, device=device)[::2],
    ]
    assert not dests[0].is_contiguous() and not dests[3].is_contiguous()
    want = [torch.empty_like(t, device="cpu") for t in dests]
    detokenize_ref(ref.view(1, -1), want, plan)
    detokenize(ref.to(device), dests, plan, backend=backend)
    for got, exp in zip(dests, want):
        assert torch.equal(got.cpu(), exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_contiguous_views(backend, gen):
    """Contiguous views at odd element offsets take the kernels' unaligned paths."""
    device = backend_device(backend)
    plan = make_plan([300, 17, 129], 64, "layer", True, gen)
    buf = torch.randn(500, generator=gen).to(device)
    sources = [buf[1:301], buf[303:320], buf[321:450]]
    assert all(s.is_contiguous() for s in sources)
    ref = torch.empty(1, plan.num_tokens, 64)
    tokenize_ref(ref.view(1, -1), [s.cpu() for s in sources], plan)
    tokens = tokenize(sources, plan, backend=backend)
    assert torch.equal(tokens.cpu(), ref)
    out = torch.full((500,), float("nan"), device=device)
    dests = [out[1:301], out[303:320], out[321:450]]
    detokenize(tokens, dests, plan, backend=backend)
    want = [torch.empty(n) for n in plan.numel]
    detokenize_ref(ref.view(1, -1), want, plan)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(dests, want))


def test_triton_aligned_hint_needs_aligned_offsets():
    """ALIGNED tells the Triton kernels that every source/destination address is 16-byte
    aligned and every element offset into the tokens is a multiple of 16 bytes. A misaligned
    token base whose offsets happen to realign it must not set it (the offset hint would be
    false)."""
    from d2nwg.kernels.tokenize import _aligned

    assert _aligned([0, 32], 64, [0, 4, 12], 4)
    assert not _aligned([0, 8], 64, [0, 4], 4)  # a misaligned source
    assert not _aligned([0, 32], 64, [0, 6], 4)  # an offset of 24 bytes
    assert not _aligned([0, 32], 56, [2, 6], 4)  # 56 + 8 and 56 + 24 are aligned
    assert _aligned([16], 16, [8, 16], 2) and not _aligned([16], 16, [4], 2)


# ----------------------------------------------------------------------------------------
# Dispatch: keyword, environment variable, reasons.
# ----------------------------------------------------------------------------------------
def small_case(gen):
    plan = make_plan([5, 9], 4, "layer", True, gen)
    return plan, random_sources(plan, 1, gen, [torch.float32])


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_env_var_forces_backend(backend, gen, monkeypatch):
    backend_device(backend)
    plan, sources = small_case(gen)
    monkeypatch.setenv("D2NWG_BACKEND", backend)
    rows = torch.empty(1, plan.row_size)
    assert select("tokenize", TOKENIZE_BACKENDS, rows, sources, plan).name == backend
    assert select("detokenize", DETOKENIZE_BACKENDS, rows, sources, plan).name == backend
    # And the public function really runs it: spy on the chosen implementation.
    calls = []
    if backend == "triton":
        import d2nwg.kernels.tokenize as kt

        real = kt.tokenize_triton
        monkeypatch.setattr(kt, "tokenize_triton", lambda *a, **k: (calls.append(1), real(*a, **k)))
    elif backend == "cpp":
        real_op = torch.ops.d2nwg.tokenize_

        class Spy:
            def __call__(self, *a):
                calls.append(1)
                return real_op(*a)

        monkeypatch.setattr(torch.ops.d2nwg, "tokenize_", Spy())
    ref = torch.empty(1, plan.num_tokens, 4)
    tokenize_ref(ref.view(1, -1), sources, plan)
    assert torch.equal(tokenize(sources, plan), ref)
    if backend != "torch":
        assert calls, f"D2NWG_BACKEND={backend} did not run the {backend} kernel"


def test_default_dispatch_on_cpu_prefers_cpp(gen, monkeypatch):
    monkeypatch.delenv("D2NWG_BACKEND", raising=False)
    plan, sources = small_case(gen)
    rows = torch.empty(1, plan.row_size)
    chosen = select("tokenize", TOKENIZE_BACKENDS, rows, sources, plan).name
    assert chosen == ("cpp" if _ext.cpp_reason() is None else "torch")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised where CUDA cannot run")
@pytest.mark.parametrize("how", ["keyword", "env"])
def test_forcing_cuda_here_lists_every_reason(how, gen, monkeypatch):
    plan, sources = small_case(gen)
    kwargs = {}
    if how == "keyword":
        kwargs["backend"] = "cuda"
    else:
        monkeypatch.setenv("D2NWG_BACKEND", "cuda")
    with pytest.raises(d2nwg.BackendUnavailableError) as err:
        tokenize(sources, plan, **kwargs)
    message = str(err.value)
    for name in ("cuda", "triton", "cpp", "torch"):
        assert f"  {name}:" in message, message
    assert "needs CUDA tensors" in message
    with pytest.raises(d2nwg.BackendUnavailableError):
        detokenize(
            torch.zeros(1, plan.num_tokens, 4),
            [torch.empty_like(s) for s in sources],
            plan,
            **kwargs,
        )


# ----------------------------------------------------------------------------------------
# The compiled op's own checks (called directly, bypassing the Python checks).
# ----------------------------------------------------------------------------------------
def test_compiled_op_rejects_bad_arguments(gen):
    backend_device("cpp")
    plan, sources = small_case(gen)
    out = torch.empty(1, plan.row_size)
    args = (list(plan.offset), list(plan.span), list(plan.shift), list(plan.rscale))
    torch.ops.d2nwg.tokenize_(out, sources, *args)  # fine
    with pytest.raises(RuntimeError, match="tile"):
        torch.ops.d2nwg.tokenize_(out, sources, [0, 4], list(plan.span), *args[2:])
    with pytest.raises(RuntimeError, match="sources"):
        torch.ops.d2nwg.tokenize_(out, sources[:1], *args)
    with pytest.raises(RuntimeError, match="one entry per segment"):
        torch.ops.d2nwg.tokenize_(out, sources, *args[:3], [1.0])
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.d2nwg.tokenize_(out, [sources[0], torch.randn(3, 3).t()], *args)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.d2nwg.tokenize_(out, [sources[0], torch.ones(9, dtype=torch.int32)], *args)
    dests = [torch.empty(5), torch.empty(9)]
    with pytest.raises(RuntimeError, match="overruns"):
        torch.ops.d2nwg.detokenize_(
            out, dests, [0, out.shape[1] - 4], list(plan.shift), list(plan.scale)
        )


def test_out_of_wrong_dtype_or_device_is_rejected(gen):
    plan, sources = small_case(gen)
    with pytest.raises(d2nwg.DTypeError, match="out has dtype"):
        tokenize(sources, plan, out=torch.empty(1, plan.num_tokens, 4, dtype=torch.int32))
    with pytest.raises(d2nwg.DeviceError, match="out is on"):
        tokenize(sources, plan, out=torch.empty(1, plan.num_tokens, 4, device="meta"))


def test_plan_must_tile_the_row():
    with pytest.raises(d2nwg.ConfigError, match="segment 1"):
        ChunkPlan((5, 3), (0, 9), (8, 4), (0.0, 0.0), (1.0, 1.0), 3, 4)  # gap
    with pytest.raises(d2nwg.ConfigError, match="numel <= span"):
        ChunkPlan((5, 5), (0, 8), (8, 4), (0.0, 0.0), (1.0, 1.0), 3, 4)
    with pytest.raises(d2nwg.ConfigError, match="cover 12 elements, the row has 16"):
        ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, 0.0), (1.0, 1.0), 4, 4)
    with pytest.raises(d2nwg.ConfigError, match="scale"):
        ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, 0.0), (0.0, 1.0), 3, 4)
    with pytest.raises(d2nwg.ConfigError, match="one entry per segment"):
        ChunkPlan((5, 3), (0, 8), (8, 4), (0.0,), (1.0, 1.0), 3, 4)


@pytest.mark.skipif(_ext.IMPORT_ERROR is not None, reason="d2nwg._C is not built")
def test_torch_compile_traces_through_the_compiled_ops():
    plan = ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, 1.0), (2.0, 1.0), 3, 4)
    a, b = torch.randn(5), torch.randn(3)

    def round_trip(a, b):
        tokens = tokenize([a * 2, b], plan, backend="cpp")
        outs = [torch.empty(5), torch.empty(3)]
        detokenize(tokens + 1, outs, plan, backend="cpp")
        return tokens, outs

    compiled = torch.compile(round_trip, backend="aot_eager", fullgraph=True)
    (got_tokens, got_outs), (want_tokens, want_outs) = compiled(a, b), round_trip(a, b)
    assert torch.equal(got_tokens, want_tokens)
    assert all(torch.equal(g, w) for g, w in zip(got_outs, want_outs))
