"""WeightTokenizer: layout, statistics, round trips, files and bad input."""

import os

import pytest
import torch

import d2nwg
from d2nwg import WeightTokenizer

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3),
        torch.nn.BatchNorm2d(5),
        torch.nn.Flatten(),
        torch.nn.Linear(7, 11),
        torch.nn.LayerNorm(11),
        torch.nn.Linear(11, 1),
    )


def random_sd(template, gen, dtype=None, mean=0.0):
    return {
        k: (torch.randn(v.shape, generator=gen, dtype=torch.float64) * 0.5 + mean).to(
            dtype or v.dtype
        )
        if v.is_floating_point()
        else v.clone()
        for k, v in template.items()
    }


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between float32 tensors of the same sign."""
    ia, ib = a.float().view(torch.int32).long(), b.float().view(torch.int32).long()
    return (ia - ib).abs()


@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_layout_mask_positions(granularity, chunk_size):
    sd = make_model(0).state_dict()
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=chunk_size, granularity=granularity)
    names = [k for k in sd if "running" not in k and "num_batches" not in k]
    assert tok.layer_names == names
    assert tok.num_params == sum(sd[k].numel() for k in names)
    assert tok.mask.shape == (tok.num_tokens, chunk_size)
    assert int(tok.mask.sum()) == tok.num_params
    if granularity == "layer":
        expected_tokens = sum(-(-sd[k].numel() // chunk_size) for k in names)
        # Every layer starts on a token boundary, chunk indices count up within a layer.
        for i, k in enumerate(names):
            rows = (tok.positions[:, 0] == i).nonzero().flatten()
            assert len(rows) == -(-sd[k].numel() // chunk_size)
            assert torch.equal(tok.positions[rows, 1], torch.arange(len(rows)))
    else:
        expected_tokens = -(-tok.num_params // chunk_size)
        assert torch.equal(tok.positions[:, 1], torch.arange(tok.num_tokens))
        assert bool(tok.mask.flatten()[: tok.num_params].all())
    assert tok.num_tokens == expected_tokens
    assert tok.kinds.shape == (tok.num_tokens,)
    assert int(tok.kinds.max()) < len(tok.kind_names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_round_trip_bit_exact_without_normalization(dtype, granularity, gen):
    template = make_model(0).to(dtype).state_dict()
    tok = WeightTokenizer.from_state_dict(
        template, chunk_size=6, granularity=granularity, normalize=None
    )
    sds = [random_sd(template, gen) for _ in range(3)]
    token_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tokens = tok.tokenize(sds, dtype=token_dtype)
    assert tokens.shape == (3, tok.num_tokens, 6)
    assert bool((tokens[:, ~tok.mask] == 0).all()), "padding must be zero"
    for sd, back in zip(sds, tok.detokenize(tokens)):
        assert list(back) == tok.layer_names
        for k, v in back.items():
            assert v.dtype == sd[k].dtype and v.shape == sd[k].shape
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.01, 3.0])
def test_round_trip_normalized(dtype, offset, gen):
    """Exact, but for float32 weights of centered layers (|mean| >= std/2): there 2 ulp.

    A float32 token keeps 24 bits of (x - shift) / scale, so in a centered layer the error
    is relative to max(|x|, |x - shift|). 16-bit weights (8 or 11 bits) fit, and so does
    every weight of an uncentered layer (x / 2^k is exact). Zeros come back as zeros.
    """
    template = make_model(2).to(dtype).state_dict()
    zoo = [random_sd(template, gen, mean=offset) for _ in range(4)]
    for sd in zoo:  # exact zeros (pruned weights) must survive centering
        sd["3.weight"][0, :3] = 0
    tok = WeightTokenizer.from_state_dict(template, chunk_size=16).fit(zoo)
    shift, scale = d2nwg.tokenizer.normalization(tok.mean, tok.std)
    big = tok.layer_names.index("3.weight")
    assert bool(shift[big] != 0) == (offset > 1), "only layers with a large mean are centered"
    # float32 tokens hold 16-bit and float32 weights; float64 weights need float64 tokens.
    tokens = tok.tokenize(zoo, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    real = tokens[:, tok.mask]
    assert abs(float(real.mean())) < 0.2 and 0.5 < float(real.std()) < 2.0
    wide = dtype in (torch.float32, torch.float64)  # as wide as the token: no room to center
    for sd, back in zip(zoo, tok.detokenize(tokens)):
        for i, k in enumerate(tok.layer_names):
            if k == "3.weight":
                assert bool((back[k][0, :3] == 0).all())
            if not wide or shift[i] == 0:
                assert torch.equal(back[k], sd[k]), k
                continue
            x = sd[k].double()
            bits = 23 if dtype == torch.float32 else 52
            magnitude = torch.maximum(x.abs(), (x - shift[i]).abs())
            ulp = torch.exp2(torch.floor(torch.log2(magnitude)) - bits)
            assert bool(((back[k].double() - x).abs() <= 2 * ulp).all()), k
            if dtype == torch.float32:
                usual = (x - shift[i]).abs() <= x.abs()
                assert bool((ulp_distance(back[k][usual], sd[k][usual]) <= 2).all()), k
    if dtype == torch.float32:  # float64 tokens hold every float32 weight exactly
        for sd, back in zip(zoo, tok.detokenize(tok.tokenize(zoo, dtype=torch.float64))):
            for k in back:
                assert torch.equal(back[k], sd[k]), k


def test_fit_streams_and_matches_float64_statistics(gen):
    template = make_model(3).state_dict()
    zoo = [random_sd(template, gen, mean=float(i)) for i in range(5)]
    tok = WeightTokenizer.from_state_dict(template, chunk_size=8)
    tok.fit(iter(zoo))  # a one-shot iterator: fit must not need the zoo twice
    for i, name in enumerate(tok.layer_names):
        values = torch.cat([sd[name].double().flatten() for sd in zoo])
        expected_std = values.std(correction=0)
        if expected_std == 0:
            expected_std = torch.tensor(1.0, dtype=torch.float64)
        torch.testing.assert_close(tok.mean[i], values.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tok.std[i], expected_std, rtol=1e-10, atol=1e-12)


def test_constant_layer_gets_unit_std():
    template = make_model(0).state_dict()
    tok = WeightTokenizer.from_state_dict(template, chunk_size=4).fit([template, template])
    ln = tok.layer_names.index("4.weight")  # LayerNorm weight: all ones in every model
    assert float(tok.std[ln]) == 1.0 and float(tok.mean[ln]) == 1.0
    shift, scale = d2nwg.tokenizer.normalization(tok.mean, tok.std)
    assert float(shift[ln]) == 1.0 and float(scale[ln]) == 1.0
    assert bool((tok.tokenize(template)[0, tok.positions[:, 0] == ln] == 0).all())
    back = tok.detokenize(tok.tokenize(template))[0]
    assert torch.equal(back["4.weight"], template["4.weight"])


def test_default_selection_and_globs():
    sd = make_model(0).state_dict()
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=4)
    assert not any("running" in n or "num_batches" in n for n in tok.layer_names)
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=4, include=["*.weight"], exclude=["0.*"])
    assert tok.layer_names == ["1.weight", "3.weight", "4.weight", "5.weight"]
    # Ignored names may still be present in later state dicts.
    tok.tokenize(sd)


def test_tied_tensors_tokenized_once_and_restored_to_every_name(gen):
    emb = torch.nn.Embedding(9, 4)
    head = torch.nn.Linear(4, 9, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "mid": torch.nn.Linear(4, 4), "head": head})
    sd = model.state_dict()
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=8, normalize=None)
    assert tok.layer_names == ["emb.weight", "mid.weight", "mid.bias"]
    assert tok.layers[0].aliases == ("head.weight",)
    assert tok.num_params == 36 + 16 + 4
    back = tok.detokenize(tok.tokenize(sd))[0]
    assert set(back) == set(sd)
    assert back["head.weight"] is back["emb.weight"]
    # A zoo member saved without the tied copy (safetensors drops shared tensors) is fine too.
    untied = {k: v for k, v in sd.items() if k != "head.weight"}
    assert torch.equal(tok.tokenize(untied), tok.tokenize(sd))

    fresh = torch.nn.ModuleDict(
        {
            "emb": torch.nn.Embedding(9, 4),
            "mid": torch.nn.Linear(4, 4),
            "head": torch.nn.Linear(4, 9, bias=False),
        }
    )  # untied copy
    tok.detokenize_into(fresh, tok.tokenize(sd)[0])
    assert torch.equal(fresh.head.weight, sd["emb.weight"])
    assert torch.equal(fresh.emb.weight, sd["emb.weight"])


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_detokenize_into_module_and_state_dict_in_place(target_dtype, gen):
    template = make_model(4).state_dict()
    zoo = [random_sd(template, gen) for _ in range(2)]
    tok = WeightTokenizer.from_state_dict(template, chunk_size=9).fit(zoo)
    tokens = tok.tokenize(zoo)
    model = make_model(5).to(target_dtype)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    tok.detokenize_into(model, tokens[1])
    expected = tok.detokenize(tokens)
    for name, p in model.named_parameters():
        assert p.data_ptr() == ptrs[name], "must write in place"
        assert torch.equal(p.detach(), expected[1][name].to(target_dtype)), name
    target = {k: torch.zeros_like(v) for k, v in template.items()}
    tok.detokenize_into(target, tokens[0])
    for name in tok.layer_names:
        assert torch.equal(target[name], expected[0][name])


def test_save_load_round_trip(tmp_path, gen):
    template = make_model(6).state_dict()
    zoo = [random_sd(template, gen) for _ in range(3)]
    tok = WeightTokenizer.from_state_dict(template, chunk_size=13, granularity="model").fit(zoo)
    path = tmp_path / "sub" / "tok.safetensors"
    tok.save(path)
    assert sorted(os.listdir(path.parent)) == ["tok.safetensors"], "no temporary file left"
    loaded = WeightTokenizer.load(path)
    assert loaded.layers == tok.layers and loaded.ignored == tok.ignored
    assert torch.equal(loaded.mean, tok.mean) and torch.equal(loaded.std, tok.std)
    assert torch.equal(loaded.tokenize(zoo), tok.tokenize(zoo))


def test_load_errors_name_the_file(tmp_path):
    tok = WeightTokenizer.from_state_dict(make_model(0).state_dict(), chunk_size=4)
    path = tmp_path / "tok.safetensors"
    with pytest.raises(d2nwg.FileFormatError, match="no such"):
        WeightTokenizer.load(path)
    tok.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(d2nwg.FileFormatError, match="truncated.safetensors"):
        WeightTokenizer.load(truncated)

    from safetensors.torch import save_file

    layout = tok._layout()
    newer = tmp_path / "newer.safetensors"
    layout["version"] = 99
    import json

    save_file({"mean": tok.mean, "std": tok.std}, newer, metadata={"d2nwg": json.dumps(layout)})
    with pytest.raises(d2nwg.FileFormatError, match="newer"):
        WeightTokenizer.load(newer)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(d2nwg.FileFormatError, match="foreign.safetensors"):
        WeightTokenizer.load(foreign)
    bad_stats = tmp_path / "bad.safetensors"
    layout["version"] = 1
    save_file(
        {"mean": torch.zeros(2, dtype=torch.float64), "std": torch.ones(2, dtype=torch.float64)},
        bad_stats,
        metadata={"d2nwg": json.dumps(layout)},
    )
    with pytest.raises(d2nwg.FileFormatError, match="bad.safetensors"):
        WeightTokenizer.load(bad_stats)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    tok = WeightTokenizer.from_state_dict(make_model(0).state_dict(), chunk_size=4)
    import safetensors.torch

    def broken(*args, **kwargs):
        open(args[1], "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        tok.save(tmp_path / "tok.safetensors")
    assert os.listdir(tmp_path) == []


def test_bad_input_is_named(gen):
    template = make_model(0).state_dict()
    tok = WeightTokenizer.from_state_dict(template, chunk_size=4)
    missing = {k: v for k, v in template.items() if k != "3.weight"}
    with pytest.raises(d2nwg.KeyMismatchError, match=r"missing keys \['3.weight'\]"):
        tok.tokenize(missing)
    with pytest.raises(d2nwg.KeyMismatchError, match="unexpected keys.*'extra'"):
        tok.tokenize({**template, "extra": torch.zeros(1)})
    with pytest.raises(d2nwg.ShapeError, match="'3.weight'.*shape"):
        tok.tokenize({**template, "3.weight": torch.zeros(11, 8)})
    with pytest.raises(d2nwg.DTypeError, match="'3.weight'.*dtype"):
        tok.tokenize({**template, "3.weight": template["3.weight"].half()})
    bad = dict(template)
    bad["5.bias"] = torch.tensor([float("nan")])
    with pytest.raises(d2nwg.NonFiniteError, match="'5.bias'"):
        tok.tokenize(bad)
    with pytest.raises(d2nwg.NonFiniteError, match="'5.bias'"):
        tok.fit([bad])
    lenient = WeightTokenizer.from_state_dict(template, chunk_size=4, allow_nonfinite=True)
    assert bool(lenient.tokenize(bad).isnan().any())
    big = {**template, "3.weight": torch.full((11, 7), 1e6)}
    with pytest.raises(d2nwg.NonFiniteError, match="overflow"):
        tok.tokenize(big, dtype=torch.float16)
    with pytest.raises(d2nwg.ConfigError, match="chunk_size"):
        WeightTokenizer.from_state_dict(template, chunk_size=0)
    with pytest.raises(d2nwg.ConfigError, match="no floating tensor"):
        WeightTokenizer.from_state_dict(template, include=["nothing*"])
    with pytest.raises(d2nwg.DTypeError, match="num_batches_tracked"):
        WeightTokenizer.from_state_dict(template, include=["*num_batches_tracked"], exclude=[])
    with pytest.raises(d2nwg.ConfigError, match="granularity"):
        WeightTokenizer.from_state_dict(template, granularity="tensor")
    tokens = tok.tokenize(template)
    with pytest.raises(d2nwg.ShapeError, match=r"expected \[N, "):
        tok.detokenize(tokens[0])
    with pytest.raises(d2nwg.ShapeError, match="tokens have shape"):
        tok.detokenize(tokens[:, :-1])
    with pytest.raises(d2nwg.ShapeError, match="tokens have shape"):
        tok.detokenize_into(make_model(1), tokens)
    with pytest.raises(d2nwg.ShapeError, match="'3.weight'"):
        tok.detokenize_into({**template, "3.weight": torch.zeros(3)}, tokens[0])
    assert isinstance(d2nwg.KeyMismatchError("x"), KeyError)  # catchable the builtin way too


# ---- issue 10: ties are checked per model; meta templates; destinations checked first ----
def test_tie_from_storage_is_checked_in_every_model():
    w = torch.randn(4, 3)
    tok = WeightTokenizer.from_state_dict({"emb": w, "head": w}, chunk_size=4, normalize=None)
    assert tok.layers[0].aliases == ("head",)
    same = {"emb": torch.randn(4, 3)}
    same["head"] = same["emb"].clone()  # equal values in separate tensors: still a valid tie
    back = tok.detokenize(tok.tokenize(same))[0]
    assert torch.equal(back["head"], same["head"])
    lenient = WeightTokenizer.from_state_dict(
        {"emb": w, "head": w}, chunk_size=4, normalize=None, allow_nonfinite=True
    )
    nan = torch.full((4, 3), float("nan"))
    lenient.tokenize({"emb": nan, "head": nan.clone()})  # NaN ties hold bit for bit
    differs = {"emb": torch.randn(4, 3), "head": torch.randn(4, 3)}
    with pytest.raises(d2nwg.KeyMismatchError, match="'head'.*'emb'"):
        tok.tokenize(differs)
    with pytest.raises(d2nwg.KeyMismatchError, match="'head'.*'emb'"):
        WeightTokenizer.from_state_dict({"emb": w, "head": w}, chunk_size=4).fit([same, differs])
    signed = {"emb": torch.zeros(4, 3), "head": -torch.zeros(4, 3)}  # bits differ: -0.0
    with pytest.raises(d2nwg.KeyMismatchError):
        tok.tokenize(signed)
    with pytest.raises(d2nwg.KeyMismatchError):  # a tied copy of another shape or dtype
        tok.tokenize({"emb": w, "head": w.double()})


def test_meta_template_does_not_tie_unrelated_tensors():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        tied = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 3), "head": torch.nn.Linear(3, 5)})
    tied.head.weight = tied.emb.weight
    tok = WeightTokenizer.from_state_dict(model.state_dict(), chunk_size=4, normalize=None)
    assert all(spec.aliases == () for spec in tok.layers)
    assert tok.layer_names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    real = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    back = tok.detokenize(tok.tokenize(real))[0]
    assert all(torch.equal(back[k], real[k]) for k in real)
    # Real ties of a meta module are still found (same storage object).
    tok2 = WeightTokenizer.from_state_dict(tied.state_dict(), chunk_size=4, normalize=None)
    assert tok2.layers[0].aliases == ("head.weight",)
    # Meta tensors hold no weights: tokenizing or writing into them is refused by name.
    with pytest.raises(d2nwg.DeviceError, match="meta"):
        tok.tokenize(model.state_dict())
    with pytest.raises(d2nwg.DeviceError, match="meta"):
        tok.detokenize_into(model, tok.tokenize(real)[0])


def test_sparse_weights_are_refused_by_name():
    sd = {"a": torch.randn(3, 3), "b": torch.randn(3, 3)}
    with pytest.raises(d2nwg.DTypeError, match="'b'.*layout"):
        WeightTokenizer.from_state_dict({"a": sd["a"], "b": sd["b"].to_sparse()}, chunk_size=4)
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=4)
    with pytest.raises(d2nwg.DTypeError, match="'b'.*layout"):
        tok.tokenize({"a": sd["a"], "b": sd["b"].to_sparse()})
    with pytest.raises(d2nwg.DTypeError, match="'b'.*layout"):
        tok.detokenize_into(
            {"a": torch.zeros(3, 3), "b": torch.zeros(3, 3).to_sparse()}, tok.tokenize(sd)[0]
        )


def test_detokenize_into_checks_every_destination_before_writing():
    sd = {"a": torch.randn(3, 3), "b": torch.randn(3, 3), "c": torch.randn(2)}
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=4)
    tokens = tok.tokenize(sd)[0]
    bad_targets = [
        ({"b": torch.zeros(1, 3).expand(3, 3)}, d2nwg.ShapeError, "'b'.*overlapping"),
        ({"c": torch.zeros(2, dtype=torch.int64)}, d2nwg.DTypeError, "'c'"),
        ({"c": torch.zeros(3)}, d2nwg.ShapeError, "'c'"),
        ({"c": [0.0, 0.0]}, d2nwg.DTypeError, "'c'"),
        ({"c": torch.zeros(2, device="meta")}, d2nwg.DeviceError, "'c'"),
    ]
    for change, exc, match in bad_targets:
        target = {"a": torch.zeros(3, 3), "b": torch.zeros(3, 3), "c": torch.zeros(2)}
        target.update(change)
        with pytest.raises(exc, match=match):
            tok.detokenize_into(target, tokens)
        assert bool((target["a"] == 0).all()), "a destination was written before the check"
    # A target that ties two tensors the layout holds separately would lose one of them.
    shared = torch.zeros(3, 3)
    target = {"a": shared, "b": shared, "c": torch.zeros(2)}
    with pytest.raises(d2nwg.ShapeError, match="share memory"):
        tok.detokenize_into(target, tokens)
    assert bool((shared == 0).all())
    # Views of one flat buffer that do not overlap are fine.
    flat = torch.zeros(20)
    target = {"a": flat[:9].view(3, 3), "b": flat[9:18].view(3, 3), "c": flat[18:]}
    tok.detokenize_into(target, tokens)
    assert all(torch.equal(target[k], sd[k]) for k in sd)


def test_template_aliases_in_target_checked_before_writing():
    w = torch.randn(4, 3)
    tok = WeightTokenizer.from_state_dict({"emb": w, "head": w}, chunk_size=4, normalize=None)
    target = {"emb": torch.zeros(4, 3), "head": torch.zeros(3, 4)}
    with pytest.raises(d2nwg.ShapeError, match="'head'"):
        tok.detokenize_into(target, tok.tokenize({"emb": w, "head": w})[0])
    assert bool((target["emb"] == 0).all())


def test_collections_of_state_dicts_and_patterns_are_checked():
    sd = {"a.weight": torch.randn(3, 2), "b.bias": torch.randn(2)}
    with pytest.raises(d2nwg.ConfigError, match="include"):  # would match every name
        WeightTokenizer.from_state_dict(sd, include="*.weight")
    with pytest.raises(d2nwg.ConfigError, match="exclude"):
        WeightTokenizer.from_state_dict(sd, exclude=[3])
    with pytest.raises(d2nwg.DTypeError, match="template"):
        WeightTokenizer.from_state_dict([sd])
    tok = WeightTokenizer.from_state_dict(sd, chunk_size=4)
    assert torch.equal(tok.tokenize(iter([sd, sd])), tok.tokenize([sd, sd]))
    with pytest.raises(d2nwg.DTypeError, match="tokenize"):
        tok.tokenize(3)
    with pytest.raises(d2nwg.DTypeError, match="fit"):
        tok.fit(3)
    assert torch.equal(tok.fit(sd).mean, WeightTokenizer.from_state_dict(sd).fit([sd]).mean)


# ---- the package split: names, the file format, plans built once ----
def test_names_importable_from_the_tokenizer_package():
    import d2nwg.tensors
    import d2nwg.zoo

    for name in ["WeightTokenizer", "LayerSpec", "normalization", "storage_key", "StateDict"]:
        assert name in d2nwg.tokenizer.__all__ and hasattr(d2nwg.tokenizer, name), name
    assert d2nwg.tokenizer.storage_key is d2nwg.tensors.storage_key
    assert d2nwg.zoo.StateDict is d2nwg.tokenizer.StateDict is d2nwg.tensors.StateDict
    assert d2nwg.tokenizer.FORMAT == "d2nwg.WeightTokenizer" and d2nwg.tokenizer.FORMAT_VERSION == 1
    assert d2nwg.tokenizer.DEFAULT_EXCLUDE[0] == "*running_mean"
    assert d2nwg.tokenizer.CENTER_THRESHOLD == 0.5
    limits = ("MAX_CHUNK_SIZE", "MAX_NUM_TOKENS", "MAX_NUM_PARAMS", "MAX_LAYERS", "MAX_RANK")
    expected = (2**20, 2**24, 2**36, 2**20, 64)
    assert tuple(getattr(d2nwg.tokenizer, name) for name in limits) == expected


def test_file_layout_text_is_pinned(tmp_path):
    """The metadata a file holds, byte for byte: files written before and after agree."""
    from safetensors import safe_open

    w = torch.zeros(2, 3)
    sd = {"emb": w, "n.bias": torch.zeros(1), "head": w, "bn.running_mean": torch.zeros(2)}
    WeightTokenizer.from_state_dict(sd, chunk_size=4).save(tmp_path / "tok.safetensors")
    with safe_open(str(tmp_path / "tok.safetensors"), framework="pt") as f:
        text = f.metadata()["d2nwg"]
        assert sorted(f.keys()) == ["mean", "std"]
        assert f.get_tensor("std").dtype == torch.float64
    assert text == (
        '{"format": "d2nwg.WeightTokenizer", "version": 1, "chunk_size": 4, '
        '"granularity": "layer", "normalize": "layer", "allow_nonfinite": false, '
        '"ignored": ["bn.running_mean"], "layers": [{"name": "emb", "shape": [2, 3], '
        '"dtype": "float32", "aliases": ["head"], "kind": "2d.emb"}, {"name": "n.bias", '
        '"shape": [1], "dtype": "float32", "aliases": [], "kind": "1d.bias"}]}'
    )


def test_chunk_plan_built_once_per_fitted_state(gen, monkeypatch):
    from d2nwg.tokenizer import weight_tokenizer

    template = make_model(0).state_dict()
    zoo = [random_sd(template, gen, mean=2.0) for _ in range(2)]
    tok = WeightTokenizer.from_state_dict(template, chunk_size=8)
    S = len(tok.layers)
    identity = tok.plan
    assert tok.plan is identity and identity.shift == (0.0,) * S
    tok.fit(zoo)  # new statistics: a new plan
    fitted = tok.plan
    assert fitted is not identity and fitted.shift != identity.shift and tok.plan is fitted
    tok.std = tok.std * 4  # assigned statistics: a new plan too
    assert tok.plan.scale == tuple(4 * s for s in fitted.scale)
    mean = tok.mean
    tok.mean = torch.full_like(mean, 64.0)  # the mean alone
    assert tok.plan.shift == (64.0,) * S
    tok.mean = mean

    calls = []
    real = weight_tokenizer.normalization
    monkeypatch.setattr(
        weight_tokenizer, "normalization", lambda m, s: (calls.append(1), real(m, s))[1]
    )
    tok.std = tok.std / 4
    tokens = tok.tokenize(zoo)
    target = {k: torch.zeros_like(v) for k, v in template.items()}
    dests = tok.destinations(target)
    for a in range(tok.num_tokens):  # streaming: one token at a time
        tok.write_range(dests, tokens[0, a : a + 1], a)
    back = tok.detokenize(tokens)[0]
    assert len(calls) == 1, "normalization is computed once per fitted state"
    assert tok.plan == fitted
    assert all(torch.equal(target[k], back[k]) for k in tok.layer_names)
