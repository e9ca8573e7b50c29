"""Property-based tests (hypothesis) that look for the next hole before a user does (issue 10).

- Random layouts (ranks, sizes, dtypes, empty layers), chunk sizes, granularities and
  normalizations round-trip bit for bit through every CPU backend, which agree bit for bit.
- Random mutations of saved tokenizer, module and zoo files either load (to the same object
  where the mutation cannot have changed it, else to a self-consistent one) or raise
  FileFormatError: never another exception, a crash or an unbounded allocation.

Bounded and reproducible: fixed example counts, derandomized, no deadline.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from d2nwg import _ext
from d2nwg.errors import FileFormatError
from d2nwg.nn.io import load_module, save_module
from d2nwg.nn.vae import ChunkVAE, ChunkVAEConfig
from d2nwg.ops.tokenize_op import FLOAT_DTYPES, ChunkPlan, detokenize, tokenize
from d2nwg.tokenizer import WeightTokenizer

BACKENDS = ["torch", "triton"] + (["cpp"] if _ext._C is not None else [])


def bounded(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def random_weights(shape, dtype, seed: int) -> torch.Tensor:
    """Normal values at a random scale, with exact zeros and -0.0 mixed in."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** float(torch.randint(-12, 6, (), generator=g))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    x = torch.where(torch.rand(shape, generator=g) < 0.1, torch.zeros((), dtype=x.dtype), x)
    x = torch.where(torch.rand(shape, generator=g) < 0.05, -torch.zeros((), dtype=x.dtype), x)
    return x.to(dtype)


layouts = st.lists(
    st.tuples(st.lists(st.integers(0, 6), min_size=0, max_size=3), st.sampled_from(FLOAT_DTYPES)),
    min_size=1,
    max_size=5,
)


@bounded(60)
@given(
    layout=layouts,
    chunk_size=st.integers(1, 19),
    granularity=st.sampled_from(["layer", "model"]),
    num_models=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_tokenizer_round_trip_random_layouts(layout, chunk_size, granularity, num_models, seed):
    """normalize=None through float64 tokens, and float32 tokens for the non-float64 layers:
    every weight comes back bit for bit (zeros with their sign), on every CPU backend."""
    template = {
        f"l{i}.w": torch.zeros(shape, dtype=dtype) for i, (shape, dtype) in enumerate(layout)
    }
    tok = WeightTokenizer.from_state_dict(
        template, chunk_size=chunk_size, granularity=granularity, normalize=None
    )
    sds = [
        {
            k: random_weights(v.shape, v.dtype, seed + n * 101 + i)
            for i, (k, v) in enumerate(template.items())
        }
        for n in range(num_models)
    ]
    token_dtypes = [torch.float64] + (
        [torch.float32] if all(d != torch.float64 for _, d in layout) else []
    )
    for token_dtype in token_dtypes:
        reference = None
        for backend in BACKENDS:
            tokens = tok.tokenize(sds, dtype=token_dtype, backend=backend)
            assert tokens.shape == (num_models, tok.num_tokens, chunk_size)
            assert bool((tokens[:, ~tok.mask] == 0).all())
            if reference is None:
                reference = tokens
            assert torch.equal(bits(tokens), bits(reference)), backend
            back = tok.detokenize(tokens, backend=backend)
            for sd, got in zip(sds, back):
                for k, v in sd.items():
                    assert got[k].dtype == v.dtype and got[k].shape == v.shape
                    assert torch.equal(bits(got[k]), bits(v)), (backend, k)


@bounded(25)
@given(
    layout=layouts,
    chunk_size=st.integers(1, 19),
    granularity=st.sampled_from(["layer", "model"]),
    seed=st.integers(0, 2**31 - 1),
    offset=st.sampled_from([0.0, 1.0, -3.0]),
)
def test_normalized_round_trip_all_backends_agree(layout, chunk_size, granularity, seed, offset):
    """Fitted per-layer normalization through float64 tokens: 16- and 32-bit weights exact,
    and every backend gives the same bits as the reference."""
    layout = [(shape, dtype) for shape, dtype in layout if dtype != torch.float64] or [
        ([3], torch.float32)
    ]
    template = {
        f"l{i}.w": torch.zeros(shape, dtype=dtype) for i, (shape, dtype) in enumerate(layout)
    }
    sds = [
        {
            k: (random_weights(v.shape, torch.float64, seed + n * 7 + i) + offset).to(v.dtype)
            for i, (k, v) in enumerate(template.items())
        }
        for n in range(2)
    ]
    tok = WeightTokenizer.from_state_dict(
        template, chunk_size=chunk_size, granularity=granularity
    ).fit(sds)
    reference = tok.tokenize(sds, dtype=torch.float64, backend="torch")
    for backend in BACKENDS:
        tokens = tok.tokenize(sds, dtype=torch.float64, backend=backend)
        assert torch.equal(bits(tokens), bits(reference)), backend
        for sd, got in zip(sds, tok.detokenize(tokens, backend=backend)):
            for k, v in sd.items():
                assert torch.equal(bits(got[k]), bits(v)), (backend, k)


@bounded(40)
@given(
    numel=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    chunk_size=st.integers(1, 9),
    extra=st.lists(st.integers(0, 9), min_size=6, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_plans_with_padding_all_backends_agree(numel, chunk_size, extra, seed, dtype):
    """Arbitrary valid plans (spans with extra padding, empty segments) on the ops directly."""
    span = [n + e for n, e in zip(numel, extra)]
    total = sum(span)
    span[-1] += -total % chunk_size
    offset = [sum(span[:i]) for i in range(len(span))]
    g = torch.Generator().manual_seed(seed)
    mean = tuple(float(torch.randn((), generator=g)) for _ in numel)
    std = tuple(float(torch.rand((), generator=g)) + 0.5 for _ in numel)
    plan = ChunkPlan(
        tuple(numel), tuple(offset), tuple(span), mean, std, sum(span) // chunk_size, chunk_size
    )
    sources = [random_weights((n,), dtype, seed + i) for i, n in enumerate(numel)]
    reference = tokenize(sources, plan, dtype=torch.float32, backend="torch")
    for backend in BACKENDS:
        tokens = tokenize(sources, plan, dtype=torch.float32, backend=backend)
        assert torch.equal(bits(tokens), bits(reference)), backend
        dests = [torch.full((n,), 7.0, dtype=dtype) for n in numel]
        want = [torch.empty((n,), dtype=dtype) for n in numel]
        detokenize(tokens, dests, plan, backend=backend)
        detokenize(tokens, want, plan, backend="torch")
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(dests, want)), backend


# ---------------------------------------------------------------------------------------
# Mutated files
# ---------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 2**40, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value, prefix=()):
    """Every (path) to a value inside a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, new):
    if not path:
        return new
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return doc


def _delete(doc, path):
    if not path:
        return doc
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return doc


mutations = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 10**6), json_values),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.none()),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8),
        st.none(),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.none()),
)


def _mutate_file(src, dst, key, mutation):
    """Write a mutated copy of safetensors file ``src`` to ``dst``: its JSON metadata under
    ``key`` edited at a random place, or its bytes flipped or truncated."""
    kind, where, value = mutation
    if kind in ("replace", "delete"):
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(meta[key])
        paths = list(_paths(doc))
        path = paths[where % len(paths)]
        doc = _replace(doc, path, value) if kind == "replace" else _delete(doc, path)
        save_file(tensors, str(dst), metadata=dict(meta, **{key: json.dumps(doc)}))
        return
    data = bytearray(src.read_bytes())
    if kind == "flip":
        for pos, mask in where:
            data[pos % len(data)] ^= mask
    else:
        data = data[: where % len(data)]
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    sd = {
        "a.weight": torch.randn(5, 3),
        "a.bias": torch.randn(5) + 2,
        "b.weight": torch.randn(2, 5).bfloat16(),
        "n.weight": torch.ones(7),
    }
    sd["tied"] = sd["a.weight"]
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=8).fit([sd])
    tok.save(d / "tok.safetensors")
    return d, tok


@bounded(250)
@given(mutation=mutations)
def test_mutated_tokenizer_file_loads_or_raises_file_format_error(tokenizer_file, mutation):
    d, original = tokenizer_file
    bad = d / "bad.safetensors"
    _mutate_file(d / "tok.safetensors", bad, "d2nwg", mutation)
    try:
        tok = WeightTokenizer.load(bad)
    except FileFormatError as exc:
        assert "bad.safetensors" in str(exc)
        return
    # Loaded: a self-consistent tokenizer that saves and loads back to itself.
    assert tok.num_tokens * tok.chunk_size == tok.plan.row_size
    assert tok.mask.shape == (tok.num_tokens, tok.chunk_size)
    tok.save(d / "again.safetensors")
    again = WeightTokenizer.load(d / "again.safetensors")
    assert again.layers == tok.layers and again.chunk_size == tok.chunk_size
    assert torch.equal(again.mean, tok.mean) and torch.equal(again.std, tok.std)
    if mutation[0] == "truncate":
        assert tok.layers == original.layers


VAE_CFG = ChunkVAEConfig(chunk_size=64, compression=16, hidden_dim=8, num_blocks=1)


@pytest.fixture(scope="module")
def module_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    vae = ChunkVAE(VAE_CFG, seed=0)
    save_module(vae, d / "vae.safetensors")
    return d, vae


@bounded(150)
@given(mutation=mutations)
def test_mutated_module_file_loads_or_raises_file_format_error(module_file, mutation):
    d, original = module_file
    bad = d / "bad.safetensors"
    _mutate_file(d / "vae.safetensors", bad, "config", mutation)
    try:
        vae = load_module(ChunkVAE, bad)
    except FileFormatError as exc:
        assert "bad.safetensors" in str(exc)
        return
    assert isinstance(vae, ChunkVAE)
    with safe_open(str(bad), framework="pt") as f:
        for k, v in vae.state_dict().items():
            assert torch.equal(v, f.get_tensor(k)), k
    if mutation[0] == "truncate":
        assert vae.config == original.config


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    from d2nwg.zoo import ModelZoo

    d = tmp_path_factory.mktemp("zoo")
    zoo = ModelZoo()
    for i in range(2):
        zoo.add({"w": torch.randn(3, 2), "b": torch.randn(3)}, meta={"i": i})
    zoo.save(d / "zoo")
    return d / "zoo"


@bounded(150)
@given(mutation=mutations)
def test_mutated_zoo_manifest_loads_or_raises_file_format_error(
    zoo_dir, mutation, tmp_path_factory
):
    from d2nwg.zoo import MANIFEST, ModelZoo

    kind, where, value = mutation
    work = tmp_path_factory.mktemp("zoo_m")
    shutil.copytree(zoo_dir, work, dirs_exist_ok=True)
    manifest = work / MANIFEST
    if kind in ("replace", "delete"):
        doc = json.loads(manifest.read_text())
        paths = list(_paths(doc))
        path = paths[where % len(paths)]
        doc = _replace(doc, path, value) if kind == "replace" else _delete(doc, path)
        manifest.write_text(json.dumps(doc))
    else:
        data = bytearray(manifest.read_bytes())
        if kind == "flip":
            for pos, mask in where:
                data[pos % len(data)] ^= mask
        else:
            data = data[: where % len(data)]
        manifest.write_bytes(bytes(data))
    try:
        zoo = ModelZoo.from_directory(work)
        for item in zoo:
            assert set(item.state_dict) <= {"w", "b"}
    except FileFormatError:
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert os.path.isdir(zoo_dir)
