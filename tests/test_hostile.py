"""Hostile and broken input to the public API and to the files it loads (issue 10).

Every case must end in a D2NWGError subclass that names what is wrong (the file and the
field, the key, the argument): never a raw torch/json/safetensors error, a crash, a silent
wrong result, or an attempt to allocate what a field merely claims.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from d2nwg import NoiseSchedule, WeightTokenizer
from d2nwg.errors import (
    ConfigError,
    D2NWGError,
    DeviceError,
    DTypeError,
    FileFormatError,
    FileWriteError,
    KeyMismatchError,
    ShapeError,
)
from d2nwg.nn.conditioners import DatasetEncoder, DatasetEncoderConfig, TextConditionerConfig
from d2nwg.nn.denoiser import LatentDenoiserConfig
from d2nwg.nn.io import load_module, save_module
from d2nwg.nn.layers import Attention
from d2nwg.nn.vae import ChunkVAE, ChunkVAEConfig
from d2nwg.ops import detokenize, tokenize
from d2nwg.ops.latent_attention_op import latent_attention
from d2nwg.ops.sampler_step_op import sampler_step
from d2nwg.ops.tokenize_op import ChunkPlan

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000


# ---------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------
def _tokenizer_file(tmp_path):
    sd = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 4)}
    sd["tied"] = sd["a.weight"]
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=8).fit([sd])
    path = tmp_path / "tok.safetensors"
    tok.save(path)
    return tok, path


def _rewrite(path, layout_text=None, tensors=None, out=None):
    """A copy of a tokenizer file with its layout text and/or tensors replaced."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if layout_text is not None:
        meta = dict(meta, d2nwg=layout_text)
    out = out or path.with_name("bad.safetensors")
    save_file(stored if tensors is None else tensors, str(out), metadata=meta)
    return out


def _layout(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["d2nwg"])


def _mutated_layouts(layout: dict):
    """(case, layout text): every class of bad metadata that issue 10 lists, and more."""

    def with_(**kw):
        return json.dumps({**layout, **kw})

    def layer(i=0, **kw):
        layers = [dict(d) for d in layout["layers"]]
        layers[i].update(kw)
        return json.dumps({**layout, "layers": layers})

    first = layout["layers"][0]["name"]
    yield "list", json.dumps([layout])
    yield "string", json.dumps("d2nwg")
    yield "number", "3"
    yield "null", "null"
    yield "not_json", "{chunk_size: 8"
    yield "deep", DEEP
    yield "deep_field", json.dumps(layout)[:-1] + ', "extra": ' + DEEP + "}"
    yield (
        "huge_int",
        with_(chunk_size=0)[:-1].replace('"chunk_size": 0', '"chunk_size": ' + HUGE_INT) + "}",
    )
    yield "nan_chunk", with_(chunk_size=0).replace('"chunk_size": 0', '"chunk_size": NaN')
    for value in ("64", True, 2.5, 2**40, 0, -1, None, [8]):
        yield f"chunk_size={value!r}", with_(chunk_size=value)
    for value in (-1, 0, "1", True, 2, 1.0, None):
        yield f"version={value!r}", with_(version=value)
    yield "format", with_(format="d2nwg.Other")
    yield "granularity", with_(granularity=3)
    yield "normalize", with_(normalize=1)
    yield "normalize_missing", json.dumps({k: v for k, v in layout.items() if k != "normalize"})
    yield "allow_nonfinite", with_(allow_nonfinite="yes")
    yield "ignored_str", with_(ignored="abc")
    yield "ignored_ints", with_(ignored=[1, 2])
    yield "unknown_field", with_(surprise=1)
    yield "layers_dict", with_(layers={"a": 1})
    yield "layers_empty", with_(layers=[])
    yield "layer_not_object", with_(layers=["a"])
    for shape in ([2**20, 2**20], [2**70], [-1, 3], [True], ["3"], [1.5], [2] * 65, 3, None):
        yield f"shape={str(shape)[:20]}", layer(shape=shape)
    for dtype in ("int64", "bool", "uint8", "nonsense", "Tensor", 5):
        yield f"dtype={dtype!r}", layer(dtype=dtype)
    yield "name_int", layer(name=5)
    yield "aliases_str", layer(aliases="x")
    yield "aliases_ints", layer(aliases=[1])
    yield (
        "missing_kind",
        json.dumps(
            {
                **layout,
                "layers": [{k: v for k, v in d.items() if k != "kind"} for d in layout["layers"]],
            }
        ),
    )
    yield "layer_extra_field", layer(extra=1)
    yield "duplicate_name", layer(1, name=first)
    yield "alias_is_a_layer", layer(1, aliases=[first])
    yield "ignored_is_a_layer", with_(ignored=[first])


def test_tokenizer_metadata_mutations_raise_file_format_error(tmp_path):
    tok, path = _tokenizer_file(tmp_path)
    assert WeightTokenizer.load(path).layer_names == tok.layer_names
    layout = _layout(path)
    cases = list(_mutated_layouts(layout))
    assert len(cases) > 50
    for case, text in cases:
        bad = _rewrite(path, text)
        with pytest.raises(FileFormatError, match="bad.safetensors") as info:
            WeightTokenizer.load(bad)
        assert isinstance(info.value, D2NWGError), case


def test_tokenizer_statistics_mutations_raise_file_format_error(tmp_path):
    tok, path = _tokenizer_file(tmp_path)
    S = len(tok.layers)
    mean, std = tok.mean.clone(), tok.std.clone()
    nan = mean.clone()
    nan[0] = float("nan")
    cases = {
        "nan_mean": {"mean": nan, "std": std},
        "nan_std": {"mean": mean, "std": nan.abs()},
        "zero_std": {"mean": mean, "std": torch.zeros(S, dtype=torch.float64)},
        "negative_std": {"mean": mean, "std": -std},
        "inf_std": {"mean": mean, "std": torch.full((S,), math.inf, dtype=torch.float64)},
        "int_mean": {"mean": mean.long(), "std": std},
        "float32_std": {"mean": mean, "std": std.float()},
        "short_mean": {"mean": mean[:-1], "std": std},
        "matrix_std": {"mean": mean, "std": std[None]},
        "missing_std": {"mean": mean},
        "extra_tensor": {"mean": mean, "std": std, "other": std.clone()},
    }
    for _case, tensors in cases.items():
        bad = _rewrite(path, tensors=tensors)
        with pytest.raises(FileFormatError, match="bad.safetensors"):
            WeightTokenizer.load(bad)


def test_tokenizer_file_without_layout_or_not_safetensors(tmp_path):
    _, path = _tokenizer_file(tmp_path)
    save_file({"mean": torch.zeros(1)}, str(tmp_path / "nolayout.safetensors"), metadata={"x": "y"})
    with pytest.raises(FileFormatError, match="nolayout"):
        WeightTokenizer.load(tmp_path / "nolayout.safetensors")
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"mean": torch.zeros(3)}, pickled)  # a pickle is never unpickled
    with pytest.raises(FileFormatError, match="pickled"):
        WeightTokenizer.load(pickled)
    data = path.read_bytes()
    for cut in (0, 7, 8, 50, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(FileFormatError, match="cut"):
            WeightTokenizer.load(tmp_path / "cut.safetensors")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=True), "chunk_size"),
        (dict(chunk_size="64"), "chunk_size"),
        (dict(chunk_size=2.0), "chunk_size"),
        (dict(chunk_size=2**40), "chunk_size"),
        (dict(granularity=None), "granularity"),
        (dict(allow_nonfinite="no"), "allow_nonfinite"),
    ],
)
def test_tokenizer_arguments_checked_by_type(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        WeightTokenizer.from_state_dict({"w": torch.randn(3)}, **kwargs)


def test_tokenizer_size_limits_before_allocation():
    big = torch.empty(0).expand(2**20, 2**20) if False else None  # no real tensor: a meta one
    sd = {"w": torch.empty(2**20, 2**20, device="meta")}
    with pytest.raises(ConfigError, match="MAX_NUM_PARAMS"):
        WeightTokenizer.from_state_dict(sd, chunk_size=1024)
    sd = {"w": torch.empty(2**25, device="meta")}
    with pytest.raises(ConfigError, match="MAX_NUM_TOKENS"):
        WeightTokenizer.from_state_dict(sd, chunk_size=1)
    del big


# ---------------------------------------------------------------------------------------
# Module files and configs
# ---------------------------------------------------------------------------------------
VAE_CFG = ChunkVAEConfig(chunk_size=64, compression=16, hidden_dim=8, num_blocks=1)


def _module_file(tmp_path, module=None):
    module = module or ChunkVAE(VAE_CFG, seed=0)
    path = tmp_path / "vae.safetensors"
    save_module(module, path)
    return module, path


def _with_config(path, text, tensors=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata(), config=text)
        stored = {k: f.get_tensor(k) for k in f.keys()}
    out = path.with_name("bad.safetensors")
    save_file(stored if tensors is None else tensors(stored), str(out), metadata=meta)
    return out


def test_module_config_mutations_raise_file_format_error(tmp_path):
    module, path = _module_file(tmp_path)
    back = load_module(ChunkVAE, path)
    assert all(
        torch.equal(a, b) for a, b in zip(back.state_dict().values(), module.state_dict().values())
    )
    config = module.config.to_dict()

    def with_(**kw):
        return json.dumps({**config, **kw})

    cases = {
        "list": json.dumps([config]),
        "string": '"x"',
        "deep": DEEP,
        "huge_int": with_(hidden_dim=1).replace('"hidden_dim": 1', '"hidden_dim": ' + HUGE_INT),
        "nan": with_(kl_weight=0.5).replace('"kl_weight": 0.5', '"kl_weight": NaN'),
        "infinity": with_(kl_weight=0.5).replace('"kl_weight": 0.5', '"kl_weight": Infinity'),
        "hidden_1e6": with_(hidden_dim=10**6),
        "chunk_2_40": with_(chunk_size=2**40),
        "chunk_str": with_(chunk_size="64"),
        "chunk_bool": with_(chunk_size=True),
        "latent_float": with_(latent_dim=2.5),
        "blocks_negative": with_(num_blocks=-1),
        "unknown_key": with_(surprise=1),
        # valid configs that do not match the stored tensors: refused before allocating
        "hidden_mismatch": with_(hidden_dim=4096),
        "blocks_mismatch": with_(num_blocks=512),
        "logvar_order": with_(logvar_min=1.0, logvar_max=0.0),
    }
    for _case, text in cases.items():
        bad = _with_config(path, text)
        with pytest.raises(FileFormatError, match="bad.safetensors"):
            load_module(ChunkVAE, bad)


def test_module_tensor_mutations(tmp_path):
    module, path = _module_file(tmp_path)
    text = module.config.to_json()
    key = next(iter(module.state_dict()))
    cases = {
        "int_tensor": lambda s: {**s, key: s[key].long()},
        "bool_tensor": lambda s: {**s, key: s[key] > 0},
        "wrong_shape": lambda s: {**s, key: s[key].flatten()},
    }
    for _case, change in cases.items():
        with pytest.raises(FileFormatError, match="bad.safetensors"):
            load_module(ChunkVAE, _with_config(path, text, change))
    missing = _with_config(path, text, lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(FileFormatError, match=f"bad.safetensors.*{key}"):  # config vs tensors
        load_module(ChunkVAE, missing)
    with pytest.raises(KeyMismatchError, match=f"bad.safetensors.*{key}"):
        load_module(ChunkVAE(VAE_CFG), missing)
    with pytest.raises(FileFormatError, match="bad.safetensors"):  # into an instance too
        load_module(ChunkVAE(VAE_CFG), _with_config(path, text, cases["int_tensor"]))


def test_save_module_tied_meta_and_failed_writes(tmp_path, monkeypatch):
    tied = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)})
    tied.b.weight = tied.a.weight
    path = tmp_path / "tied.safetensors"
    save_module(tied, path)  # tied tensors are written once per name
    fresh = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)})
    load_module(fresh, path)
    assert torch.equal(fresh.b.weight, tied.a.weight)

    with torch.device("meta"):
        meta = torch.nn.Linear(3, 3)
    with pytest.raises(DeviceError, match="meta.safetensors.*meta device"):
        save_module(meta, tmp_path / "meta.safetensors")
    assert not (tmp_path / "meta.safetensors").exists()

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileWriteError, match="file"):
        save_module(tied, blocker / "sub" / "m.safetensors")

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(FileWriteError, match="full.safetensors.*No space") as info:
        save_module(tied, tmp_path / "full.safetensors")
    assert isinstance(info.value, OSError)
    assert sorted(os.listdir(tmp_path)) == ["file", "tied.safetensors"], "a partial file was left"


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (ChunkVAEConfig, "chunk_size", True),
        (ChunkVAEConfig, "chunk_size", "64"),
        (ChunkVAEConfig, "latent_dim", 2.5),
        (ChunkVAEConfig, "kl_weight", float("nan")),
        (ChunkVAEConfig, "input_noise", float("inf")),
        (ChunkVAEConfig, "hidden_dim", 10**6),
        (ChunkVAEConfig, "hidden_dim", 10**40),
        (LatentDenoiserConfig, "hidden_dim", 10**6),
        (LatentDenoiserConfig, "depth", 10**5),
        (LatentDenoiserConfig, "qk_norm", 1),
        (LatentDenoiserConfig, "prediction_type", 3),
        (LatentDenoiserConfig, "mlp_ratio", "4"),
        (DatasetEncoderConfig, "in_features", 10**9),
        (DatasetEncoderConfig, "num_heads", True),
        (TextConditionerConfig, "dim", [256]),
    ],
)
def test_configs_checked_by_type_and_size(cls, field, value):
    with pytest.raises(ConfigError, match=f"{cls.__name__}.{field}"):
        cls(**{field: value})
    with pytest.raises(ConfigError, match=field):
        cls.from_dict({field: value})


def test_config_json_errors_are_config_errors():
    for text in (
        DEEP,
        "[1, 2]",
        '"x"',
        '{"chunk_size": ' + HUGE_INT + "}",
        '{"kl_weight": NaN}',
        "{",
        "",
    ):
        with pytest.raises(ConfigError):
            ChunkVAEConfig.from_json(text)


def test_schedule_sizes_and_types():
    for T in (10**12, 2**21, 0, True, 10.0, "1000"):
        with pytest.raises(ConfigError, match="T"):
            NoiseSchedule.linear(T)
    with pytest.raises(ConfigError, match="beta_start"):
        NoiseSchedule.linear(10, beta_start=True)
    with pytest.raises(ConfigError, match="max_beta"):
        NoiseSchedule.cosine(10, max_beta="0.9")
    with pytest.raises(ConfigError):
        NoiseSchedule.from_betas(torch.full((2**21,), 0.01))


# ---------------------------------------------------------------------------------------
# Public functions: everything reaches the user as a D2NWGError
# ---------------------------------------------------------------------------------------
def _plan():
    return ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, 0.0), (1.0, 1.0), 3, 4)


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda: tokenize([[1.0] * 5, [1.0] * 3], _plan()), DTypeError),
        (lambda: tokenize(torch.randn(8), _plan()), DTypeError),
        (lambda: tokenize([torch.randn(5), torch.randn(3)], "plan"), ConfigError),
        (lambda: tokenize([torch.randn(5), torch.randn(3)], _plan(), num_models=2), ShapeError),
        (lambda: tokenize([torch.randn(5), torch.randn(3)], _plan(), num_models=True), ConfigError),
        (lambda: tokenize([torch.randn(5).to_sparse(), torch.randn(3)], _plan()), DTypeError),
        (
            lambda: tokenize(
                [torch.randn(5, device="meta"), torch.randn(3, device="meta")], _plan()
            ),
            DeviceError,
        ),
        (lambda: tokenize([torch.randn(5), torch.randn(3)], _plan(), out=[0.0]), DTypeError),
        (lambda: detokenize([[0.0]], [torch.empty(5), torch.empty(3)], _plan()), DTypeError),
        (lambda: detokenize(torch.zeros(1, 3, 4), torch.empty(8), _plan()), DTypeError),
        (lambda: detokenize(torch.zeros(1, 3, 4), [torch.empty(5), 3], _plan()), DTypeError),
        (
            lambda: detokenize(
                torch.zeros(1, 3, 4), [torch.zeros(1).expand(5), torch.empty(3)], _plan()
            ),
            ShapeError,
        ),
        (lambda: ChunkPlan((5, True), (0, 8), (8, 4), (0.0, 0.0), (1.0, 1.0), 3, 4), ConfigError),
        (
            lambda: ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, float("nan")), (1.0, 1.0), 3, 4),
            ConfigError,
        ),
        (lambda: ChunkPlan((5, 3), (0, 8), (8, 4), (0.0, 0.0), (1.0, 1.0), 3, 2**62), ConfigError),
        (lambda: ChunkPlan((5, 3), (0, 8), (8, 2**64), (0.0, 0.0), (1.0, 1.0), 3, 4), ConfigError),
        (
            lambda: sampler_step(
                [[0.0]], torch.zeros(1, 1), torch.zeros(1, 11), torch.zeros(1, dtype=torch.long)
            ),
            DTypeError,
        ),
        (
            lambda: sampler_step(
                torch.zeros(1, 1), 0.0, torch.zeros(1, 11), torch.zeros(1, dtype=torch.long)
            ),
            DTypeError,
        ),
        (
            lambda: sampler_step(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 11), 0),
            DTypeError,
        ),
        (
            lambda: sampler_step(
                torch.zeros(1, 1),
                torch.zeros(1, 1),
                torch.zeros(1, 11),
                torch.zeros(1, dtype=torch.long),
                noise=1.0,
            ),
            DTypeError,
        ),
        (
            lambda: sampler_step(
                torch.zeros(1, 1),
                torch.zeros(1, 1),
                torch.zeros(1, 11),
                torch.zeros(1, dtype=torch.long),
                guided=1,
            ),
            DTypeError,
        ),
        (lambda: latent_attention([1.0], [1.0], [1.0]), DTypeError),
        (lambda: latent_attention(*(torch.randn(1, 1, 2, 4),) * 3, mask=[True, True]), DTypeError),
        (lambda: latent_attention(*(torch.randn(1, 1, 2, 4).to_sparse(),) * 3), DTypeError),
    ],
)
def test_public_ops_name_bad_arguments(call, exc):
    with pytest.raises(exc):
        call()


def test_networks_name_bad_input():
    enc = DatasetEncoder(
        DatasetEncoderConfig(
            in_features=6, dim=8, num_heads=2, num_inducing=2, shot_layers=1, class_layers=1
        ),
        seed=0,
    )
    with pytest.raises(ShapeError, match="shot"):
        enc(torch.randn(2, 3, 0, 6))
    with pytest.raises(ShapeError, match="class"):
        enc(torch.randn(2, 0, 4, 6))
    with pytest.raises(DTypeError, match="shot_mask"):
        enc(torch.randn(2, 3, 4, 6), shot_mask=[[True]])
    vae = ChunkVAE(VAE_CFG, seed=0).train()
    x = torch.randn(2, 3, 64)
    for mask, exc in (
        (torch.ones(3, 63, dtype=torch.bool), ShapeError),
        (torch.ones(4, 64, dtype=torch.bool), ShapeError),
        (torch.ones(3, 64), DTypeError),
        ([True], DTypeError),
    ):
        with pytest.raises(exc, match="mask"):
            vae(x, mask)
        with pytest.raises(exc, match="mask"):
            vae.loss(x, mask)
    with pytest.raises(ShapeError, match="chunks"):
        vae([1.0] * 64)
    with pytest.raises(ConfigError, match="max_batch"):
        vae.decode(torch.randn(3, 4), max_batch="2")
    attn = Attention(8, 2)
    with pytest.raises(ShapeError, match="x must be"):
        attn(torch.randn(2, 8))
    with pytest.raises(ShapeError, match="x must be"):
        attn(torch.randn(2, 3, 7))
    cross = Attention(8, 2, context_dim=5)
    with pytest.raises(ShapeError, match="context"):
        cross(torch.randn(2, 3, 8), torch.randn(2, 4, 6))
    with pytest.raises(ConfigError, match="num_heads"):
        Attention(8, 0)


def test_attention_nan_inputs_agree_across_backends():
    """NaN in a masked-out key or value, or in a query, gives the same result on every
    backend that runs here."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1] = False  # a batch element without keys returns zeros
    k[0, :, 4] = float("nan")
    v[0, :, 3] = float("nan")
    q[0, 1, 2] = float("nan")
    outs = {b: latent_attention(q, k, v, mask, backend=b) for b in ("torch", "triton")}
    ref = outs["torch"]
    for name, out in outs.items():
        assert torch.equal(out.isnan(), ref.isnan()), name
        torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-5)
    assert bool((ref[1] == 0).all())
