"""Class rows (``D2NWGConfig.class_rows``): the tokens of row k of a named layer get the
condition's class k token, so permuting the condition's classes permutes the generated rows;
the layout that says which token is which row; the checks; old generators load as before."""

from __future__ import annotations

import json

import pytest
import torch

import d2nwg
from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.nn import Condition, LatentDenoiser, LatentDenoiserConfig
from d2nwg.tokenizer import LayerSpec, LayoutPlan, WeightTokenizer, normalization
from d2nwg.windows import WindowLayout

HEAD = {"fc.weight": torch.zeros(5, 64), "fc.bias": torch.zeros(5)}
TINY = dict(hidden_dim=32, depth=2, latent_dim=8, vae_hidden_dim=32, cond_dim=16, timesteps=50)
PERM = torch.tensor([3, 0, 4, 1, 2])


def _tokenizer(template=HEAD, chunk_size=64, **kwargs) -> WeightTokenizer:
    return WeightTokenizer.from_state_dict(template, chunk_size=chunk_size, **kwargs)


def _randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: adaLN-Zero's zero-initialized branches would hide any path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


# ---------------------------------------------------------------------------- the layout
def test_rows_of_one_token_each():
    rows = _tokenizer().row_classes(["fc.weight"])
    assert rows.index.tolist() == [0, 1, 2, 3, 4, -1]  # the bias token holds all five classes
    assert rows.chunk.tolist() == [0] * 6


def test_rows_of_several_tokens_are_placed_within_the_row():
    tok = _tokenizer(chunk_size=16)  # a row is 4 tokens
    rows = tok.row_classes(["*.weight"])
    assert rows.index.tolist() == [k for k in range(5) for _ in range(4)] + [-1]
    assert rows.chunk.tolist() == [0, 1, 2, 3] * 5 + [0]
    assert tok.positions[:, 1].tolist()[:8] == list(range(8))  # the tokenizer's own: by layer


def test_rows_that_are_not_whole_tokens_are_refused():
    with pytest.raises(d2nwg.ConfigError, match=r"'fc.weight' \[5, 64\] hold 64 values"):
        _tokenizer(chunk_size=128).row_classes(["fc.weight"])
    with pytest.raises(d2nwg.ConfigError, match="'fc.bias'"):  # rows of one value
        _tokenizer().row_classes(["fc.*"])
    with pytest.raises(d2nwg.ConfigError, match="'head' matches no tokenized tensor"):
        _tokenizer().row_classes(["head"])
    with pytest.raises(d2nwg.ConfigError, match="glob patterns"):
        _tokenizer().row_classes("fc.weight")


def test_rows_in_a_model_granularity_layout():
    """Tokens that mix layers are never class rows; a row must start on a token."""
    body = {"body": torch.zeros(3, 16), "fc.weight": torch.zeros(5, 32), "fc.bias": torch.zeros(5)}
    rows = _tokenizer(body, chunk_size=16, granularity="model").row_classes(["fc.weight"])
    assert rows.index.tolist() == [-1] * 3 + [k for k in range(5) for _ in range(2)] + [-1]
    with pytest.raises(d2nwg.ConfigError, match="chunk_size"):
        body["body"] = torch.zeros(3, 15)  # fc.weight no longer starts on a token
        _tokenizer(body, chunk_size=16, granularity="model").row_classes(["fc.weight"])


def test_windows_carry_class_rows():
    tok = _tokenizer(chunk_size=16)
    plain = WindowLayout.from_tokenizer(tok, 8)
    assert plain.classes is None and "class_index" not in plain.denoiser_layout()
    win = WindowLayout.from_tokenizer(tok, 8, class_rows=["fc.weight"])
    layout = win.denoiser_layout()
    flat = tok.row_classes(["fc.weight"]).index
    assert torch.equal(layout["class_index"][win.mask], flat)
    assert (layout["class_index"][~win.mask] == -1).all()  # padding belongs to no class
    assert torch.equal(win.positions[..., 1][win.mask], torch.tensor([0, 1, 2, 3] * 5 + [0]))
    assert torch.equal(win.positions[..., 0], plain.positions[..., 0])


# ---------------------------------------------------------------------------- the denoiser
def _denoiser(**kwargs) -> LatentDenoiser:
    base = dict(latent_dim=8, hidden_dim=32, depth=2, num_heads=2, cond_dim=16, num_layer_kinds=2)
    cfg = LatentDenoiserConfig(**{**base, **kwargs}, class_rows=True)
    return _randomized(LatentDenoiser(cfg, seed=0)).eval()


LAYOUT = dict(
    positions=torch.tensor([[0, 0]] * 5 + [[1, 0]]),
    layer_kinds=torch.tensor([0] * 5 + [1]),
    class_index=torch.tensor([0, 1, 2, 3, 4, -1]),
)


def _permuted(x: torch.Tensor) -> torch.Tensor:
    """``x [B, 6, ...]`` with the five class rows in PERM's order, the bias token in place."""
    return torch.cat([x[:, PERM], x[:, 5:]], 1)


@pytest.mark.parametrize("null", [False, True])
def test_permuting_the_classes_permutes_the_rows(null):
    """Permute the class tokens and the class rows' inputs together: the class rows' outputs
    permute (to float rounding) and the bias token's stays; under the null condition (the
    unconditional branch of guidance) every row is treated alike."""
    den = _denoiser()
    g = torch.Generator().manual_seed(1)
    x, tokens, pooled = (torch.randn(*s, generator=g) for s in ((3, 6, 8), (3, 5, 16), (3, 16)))
    t = torch.tensor([0, 20, 49])
    cond = cond_p = None
    if not null:
        cond, cond_p = Condition(tokens, pooled), Condition(tokens[:, PERM], pooled)
    with torch.no_grad():
        out = den(x, t, cond, **LAYOUT)
        out_p = den(_permuted(x), t, cond_p, **LAYOUT)
    assert out.abs().mean() > 0.1
    torch.testing.assert_close(out_p, _permuted(out), atol=1e-5, rtol=1e-5)


def test_each_row_reads_its_own_class():
    """Changing class 2's token changes row 2 directly; a masked class reads the null token."""
    den = _denoiser(depth=1)
    x, tokens, pooled = torch.randn(1, 6, 8), torch.randn(1, 5, 16), torch.randn(1, 16)
    inputs = den._class_inputs(LAYOUT["class_index"], Condition(tokens, pooled), 1)
    changed = tokens.clone()
    changed[0, 2] += 1
    moved = den._class_inputs(LAYOUT["class_index"], Condition(changed, pooled), 1)
    assert (moved - inputs).abs().sum(-1)[0].nonzero().flatten().tolist() == [2]
    assert (inputs[0, 5] == 0).all()  # the bias token gets no class
    mask = torch.tensor([[True, True, True, False, True]])
    masked = den._class_inputs(LAYOUT["class_index"], Condition(tokens, pooled, mask), 1)
    null = den._class_inputs(LAYOUT["class_index"], den.null_condition(1), 1)
    torch.testing.assert_close(masked[0, 3], null[0, 3])
    torch.testing.assert_close(null[0, :5], null[0, :1].expand(5, -1))  # all rows alike
    with torch.no_grad():  # fewer classes than rows: the missing ones read the null token too
        few = den(x, torch.tensor([5]), Condition(tokens[:, :3], pooled), **LAYOUT)
    assert torch.isfinite(few).all()


def test_class_rows_checks():
    with pytest.raises(d2nwg.ConfigError, match="max_cond_slots"):
        LatentDenoiserConfig(cond_dim=8, class_rows=True, max_cond_slots=5)
    with pytest.raises(d2nwg.ConfigError, match="cond_dim"):
        LatentDenoiserConfig(class_rows=True)
    plain = LatentDenoiser(LatentDenoiserConfig(latent_dim=8, hidden_dim=32, depth=1,
                                                num_heads=2, cond_dim=16))  # fmt: skip
    with pytest.raises(d2nwg.ConfigError, match="no class rows"):
        plain(torch.randn(1, 6, 8), torch.tensor([1]), None, class_index=LAYOUT["class_index"])
    den = _denoiser()
    with pytest.raises(d2nwg.ShapeError, match="class_index has shape"):
        den(torch.randn(1, 6, 8), torch.tensor([1]), None, class_index=torch.zeros(5).long())
    with pytest.raises(d2nwg.DTypeError, match="class_index must be integers"):
        den.set_layout(None, None, torch.zeros(6))
    with pytest.raises(d2nwg.ShapeError, match=">= -1"):
        den.set_layout(None, None, torch.full((6,), -2))
    with pytest.raises(d2nwg.ConfigError, match="condition whose tokens are classes"):
        D2NWGConfig(condition="none", class_rows=["fc.weight"])
    with pytest.raises(d2nwg.ConfigError, match="glob patterns"):
        D2NWGConfig(class_rows=[3])


# ---------------------------------------------------------------------------- the generator
def _generator(class_rows, **kwargs) -> D2NWG:
    cfg = D2NWGConfig(class_rows=class_rows, sample_steps=4, **TINY, **kwargs)
    gen = D2NWG.untrained(HEAD, cfg, cond_features=12, max_classes=5)
    _randomized(gen.model)
    return gen


def test_permuting_the_condition_permutes_the_generated_rows():
    """End to end under guidance: encode a support set [5, shots, F] and sample (UniPC) from
    noise; the same support set with its classes permuted, and the class rows' noise permuted
    alike, gives the same rows permuted."""
    gen = _generator(["fc.weight"])
    den, enc = gen.model.denoiser, gen.model.encoder
    assert den.slot_embed is None and den.class_embed is not None
    layout = {k: v[0] for k, v in gen.windows.denoiser_layout().items() if v is not None}
    raw = torch.randn(2, 5, 3, 12, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    schedule = gen.config.noise_schedule()

    def run(raw, x_T):
        cond = enc(raw)
        null = den.null_condition(raw.shape[0])
        return d2nwg.sample(
            lambda x, t, c: den(x, t, c, **layout), x_T, schedule, sampler="unipc", steps=4,
            cond=cond.pack(), uncond=null.pack(cond.tokens.shape[1]), guidance_scale=2.0,
            prediction_type=den.prediction_type,
        )  # fmt: skip

    with torch.no_grad():
        out, out_p = run(raw, x_T), run(raw[:, PERM], _permuted(x_T))
    assert out[:, :5].std() > 0.1
    torch.testing.assert_close(out_p[:, :5], out[:, PERM], atol=1e-4, rtol=1e-4)


def test_class_rows_persist(tmp_path):
    gen = _generator(["fc.weight"])
    gen.save(tmp_path / "gen")
    meta = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert meta["config"]["class_rows"] == ["fc.weight"]
    loaded = D2NWG.load(tmp_path / "gen")
    assert loaded.config.class_rows == ["fc.weight"]
    assert torch.equal(loaded.windows.classes, gen.windows.classes)
    cond = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(2))
    a, b = gen.generate(cond, seed=1)[0], loaded.generate(cond, seed=1)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generators_saved_without_class_rows_load_as_before(tmp_path):
    """A config.json without the field (written before it existed) builds the slot-embedding
    denoiser it was saved with, and samples exactly as before."""
    old = _generator(None)
    assert old.model.denoiser.slot_embed is not None and old.model.denoiser.class_embed is None
    old.save(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["class_rows"]
    path.write_text(json.dumps(meta))
    loaded = D2NWG.load(tmp_path / "old")
    assert loaded.config.class_rows is None and loaded.windows.classes is None
    cond = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(2))
    a, b = old.generate(cond, seed=1)[0], loaded.generate(cond, seed=1)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_row_tokens_pad_each_row_to_whole_tokens(tmp_path):
    """Rows narrower than a token (a head on 32 features at C = 64, a bias) each start a token
    of their own, padded; tokenize, detokenize, streaming writes and the file keep that."""
    g = torch.Generator().manual_seed(0)
    shapes = {"body.weight": (32, 64), "fc.weight": (5, 32), "fc.bias": (5,)}
    mlp = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    tok = _tokenizer(mlp, row_tokens=["fc.*"])
    assert tok.row_tokens == ("fc.weight", "fc.bias") and tok.num_tokens == 32 + 5 + 5
    assert tok.mask.sum(1)[32:].tolist() == [32] * 5 + [1] * 5
    rows = tok.row_classes(["fc.*"])
    assert rows.index.tolist() == [-1] * 32 + list(range(5)) * 2
    assert rows.chunk[32:].tolist() == [0] * 10
    tok.fit([mlp, {k: 2 * v for k, v in mlp.items()}])
    tokens = tok.tokenize([mlp, {k: v.t().contiguous().t() for k, v in mlp.items()}])
    shift, scale = (float(v[1]) for v in normalization(tok.mean, tok.std))
    torch.testing.assert_close(tokens[0, 32:37, :32], (mlp["fc.weight"] - shift) / scale)
    back = tok.detokenize(tokens)
    for sd in back:  # (a centered layer's x - shift is not exact in float32)
        torch.testing.assert_close(sd, mlp, rtol=0, atol=1e-6)
    out = {k: torch.zeros_like(v) for k, v in mlp.items()}
    dests = tok.destinations(out)
    for start in range(0, tok.num_tokens, 3):  # ranges that cut rows and layers anywhere
        tok.write_range(dests, tokens[0, start : start + 3], start)
    assert all(torch.equal(out[k], v) for k, v in back[0].items())
    tok.save(tmp_path / "tok.safetensors")
    loaded = WeightTokenizer.load(tmp_path / "tok.safetensors")
    assert loaded.row_tokens == tok.row_tokens and torch.equal(loaded.mask, tok.mask)
    plain = _tokenizer(mlp)
    plain.save(tmp_path / "plain.safetensors")  # no row tokens: the file has no such field
    assert WeightTokenizer.load(tmp_path / "plain.safetensors").row_tokens == ()
    with pytest.raises(d2nwg.ConfigError, match="granularity='layer'"):
        _tokenizer(mlp, granularity="model", row_tokens=["fc.weight"])


def test_row_tokens_plan():
    """Segments of a row-token layer, the token range of a layer, and the checks."""
    layers = (LayerSpec("w", (3, 5), "float32"), LayerSpec("b", (3,), "float32"),
              LayerSpec("s", (), "float32"))  # fmt: skip
    plan = LayoutPlan(layers, 4, row_tokens=frozenset({0, 1}))
    assert [(g.layer, g.start, g.count, g.offset, g.span) for g in plan.segments] == [
        (0, 0, 5, 0, 8), (0, 5, 5, 8, 8), (0, 10, 5, 16, 8),
        (1, 0, 1, 24, 4), (1, 1, 1, 28, 4), (1, 2, 1, 32, 4), (2, 0, 1, 36, 4),
    ]  # fmt: skip
    assert plan.num_tokens == 10 and plan.token_range([1]) == (6, 9)
    assert plan.chunk_plan([1.0, 2.0, 3.0], [1.0] * 3).shift == (1.0,) * 3 + (2.0,) * 3 + (3.0,)
    with pytest.raises(d2nwg.ConfigError, match="is a scalar"):
        LayoutPlan(layers, 4, row_tokens=frozenset({2}))
    with pytest.raises(d2nwg.ConfigError, match="layer indices"):
        LayoutPlan(layers, 4, row_tokens=frozenset({3}))
    with pytest.raises(d2nwg.ConfigError, match="does not hold"):
        WeightTokenizer(layers, 4, row_tokens=["fc.weight"])


def test_class_rows_of_any_width_in_a_generator():
    """A head on 32 features (and its bias) at the derived chunk size 64: each row is a
    token, so the whole head follows the classes; in the model granularity the rows must
    already be whole tokens."""
    mlp = {"body.weight": torch.zeros(32, 64), "fc.weight": torch.zeros(5, 32),
           "fc.bias": torch.zeros(5)}  # fmt: skip
    gen = D2NWG.untrained(mlp, D2NWGConfig(class_rows=["fc.*"], **TINY), cond_features=12)
    assert gen.config.chunk_size == 64
    assert gen.windows.classes[0].tolist() == [-1] * 32 + list(range(5)) * 2
    with pytest.raises(d2nwg.ConfigError, match="divides 32"):
        cfg = D2NWGConfig(class_rows=["fc.weight"], granularity="model", **TINY)
        D2NWG.untrained(mlp, cfg, cond_features=12)


def test_windowed_generators_carry_class_rows(tmp_path):
    """With windows of 4 tokens the class rows reach the denoiser in training and in
    sampling alike, aligned (two windows padded) or overlapping (the default stride W // 2):
    a short fit and generation run, and the layout each window gets holds its rows' classes."""
    zoo = d2nwg.ModelZoo()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        sd = {k: torch.randn(v.shape, generator=g) for k, v in HEAD.items()}
        zoo.add(sd, condition=torch.randn(5, 3, 12, generator=g))
    steps = dict(vae_steps=2, diffusion_steps=2, batch_size=4, vae_batch=8, log_every=1)
    expected = {
        4: [[0, 1, 2, 3], [4, -1, -1, -1], [-1] * 4],  # rows 0-3 | row 4, padding | the bias
        0: [[0, 1, 2, 3], [2, 3, 4, -1]],  # tokens 0-3 | tokens 2-5 (the bias last)
    }
    for stride, classes in expected.items():
        cfg = D2NWGConfig(class_rows=["fc.weight"], window=4, window_stride=stride,
                          sample_steps=2, **TINY, **steps)  # fmt: skip
        gen = D2NWG(cfg).fit(zoo, out=str(tmp_path / f"run{stride}"), progress=False)
        assert gen.windows.classes.tolist() == classes
        sds = gen.generate(torch.randn(2, 5, 3, 12, generator=g), num_samples=2, seed=0)
        assert len(sds) == 4 and all(torch.isfinite(sd["fc.weight"]).all() for sd in sds)
