"""ChunkVAE, LatentDenoiser and the conditioners: shapes, gradients, masking, equivariance,
backend agreement, JSON configs, safetensors files, determinism, bf16 autocast, bad input."""

import os

import pytest
import torch

from d2nwg.errors import ConfigError, D2NWGError, DTypeError, FileFormatError, ShapeError
from d2nwg.nn.conditioners import (
    Condition,
    DatasetEncoder,
    DatasetEncoderConfig,
    NullConditioner,
    TextConditioner,
    TextConditionerConfig,
    drop_condition,
)
from d2nwg.nn.denoiser import LatentDenoiser, LatentDenoiserConfig
from d2nwg.nn.io import load_module, save_module
from d2nwg.nn.vae import ChunkVAE, ChunkVAEConfig

E = 32
VAE_CFG = ChunkVAEConfig(chunk_size=64, compression=8, hidden_dim=64, num_blocks=1)
DEN_CFG = LatentDenoiserConfig(
    latent_dim=8,
    hidden_dim=64,
    depth=2,
    num_heads=2,
    cond_dim=E,
    num_layer_kinds=3,
    max_cond_slots=8,
)
ENC_CFG = DatasetEncoderConfig(
    in_features=12, dim=E, num_heads=2, num_inducing=4, shot_layers=1, class_layers=1
)
TXT_CFG = TextConditionerConfig(in_dim=20, dim=E)


def _randomize(module, gen, std=0.1):
    """Leave the zero init (adaLN-Zero) so that every parameter gets a nonzero gradient."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def _den_inputs(gen, B=2, T=21, K=5):
    x = torch.randn(B, T, DEN_CFG.latent_dim, generator=gen)
    t = torch.randint(0, 1000, (B,), generator=gen)
    cond = Condition(
        torch.randn(B, K, E, generator=gen),
        torch.randn(B, E, generator=gen),
        torch.rand(B, K, generator=gen) < 0.7,
    )
    cond.mask[:, 0] = True
    pos = torch.stack([torch.arange(T) // 4, torch.arange(T) % 4], -1)
    kinds = torch.arange(T) % 3
    return x, t, cond, pos, kinds


# ----------------------------------------------------------------------------------------
# Shapes and gradients.
# ----------------------------------------------------------------------------------------
def test_shapes(gen):
    vae = ChunkVAE(VAE_CFG, seed=0).eval()
    x = torch.randn(3, 7, 64, generator=gen)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 7, 8)
    assert vae.decode(mu).shape == (3, 7, 64)
    assert torch.allclose(vae.decode(mu, max_batch=5), vae.decode(mu), atol=1e-6)
    assert vae.encode_mean(x, max_batch=4).shape == (3, 7, 8)
    big = ChunkVAE(ChunkVAEConfig(chunk_size=16384, compression=256, hidden_dim=32, num_blocks=0))
    assert big.decode(torch.zeros(2, 64), max_batch=1).shape == (2, 16384)

    den = LatentDenoiser(DEN_CFG, seed=0)
    xt, t, cond, pos, kinds = _den_inputs(gen)
    out = den(xt, t, cond, positions=pos, layer_kinds=kinds)
    assert out.shape == xt.shape and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero
    enc = DatasetEncoder(ENC_CFG, seed=0)
    c = enc(torch.randn(2, 5, 3, 12, generator=gen))
    assert c.tokens.shape == (2, 5, E) and c.pooled.shape == (2, E)
    txt = TextConditioner(TXT_CFG, seed=0)(torch.randn(2, 4, 20, generator=gen))
    assert txt.tokens.shape == (2, 4, E) and txt.pooled.shape == (2, E)
    assert den(xt, t, txt).shape == xt.shape


def test_gradients_reach_every_parameter(gen):
    vae = ChunkVAE(VAE_CFG, seed=0).train()
    mask = torch.rand(7, 64, generator=gen) < 0.8
    vae.loss(torch.randn(3, 7, 64, generator=gen), mask, generator=gen)["loss"].backward()

    den = _randomize(LatentDenoiser(DEN_CFG, seed=0), gen)
    enc = DatasetEncoder(ENC_CFG, seed=0)
    txt = TextConditioner(TXT_CFG, seed=0)
    xt, t, _, pos, kinds = _den_inputs(gen)
    c1 = enc(torch.randn(2, 5, 3, 12, generator=gen))
    c1 = drop_condition(c1, 0.5, torch.Generator().manual_seed(1), den.null)
    c2 = txt(
        torch.randn(2, 4, 20, generator=gen), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    )
    den.set_layout(pos, kinds)
    loss = den(xt, t, c1).square().mean() + den(xt, t, c2).square().mean()
    loss = loss + den(xt, t, None).square().mean()  # the null condition
    loss.backward()
    for net in (vae, den, enc, txt):
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{type(net).__name__}.{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{type(net).__name__}.{name} has a zero gradient"


# ----------------------------------------------------------------------------------------
# Masks, padding, class slots.
# ----------------------------------------------------------------------------------------
def test_padding_and_masked_condition_tokens_do_not_change_real_outputs(gen):
    den = _randomize(LatentDenoiser(DEN_CFG, seed=0), gen).eval()
    xt, t, cond, pos, kinds = _den_inputs(gen, T=21)
    real = torch.ones(2, 21, dtype=torch.bool)
    real[0, 15:] = False
    real[1, 9:] = False
    out = den(xt, t, cond, positions=pos, layer_kinds=kinds, mask=real)
    xt2 = torch.where(real[..., None], xt, torch.randn(xt.shape, generator=gen) * 100)
    tokens2 = torch.where(
        cond.mask[..., None], cond.tokens, torch.randn(cond.tokens.shape, generator=gen) * 100
    )
    out2 = den(
        xt2,
        t,
        Condition(tokens2, cond.pooled, cond.mask),
        positions=pos,
        layer_kinds=kinds,
        mask=real,
    )
    assert torch.allclose(out[real], out2[real], atol=1e-5)
    # A sequence without padding gives the same real outputs as the padded one.
    out_short = den(
        xt[1:, :9],
        t[1:],
        cond.index_select(torch.tensor([1])),
        positions=pos[:9],
        layer_kinds=kinds[:9],
    )
    assert torch.allclose(out_short[0], out[1, :9], atol=1e-5)

    txt = TextConditioner(TXT_CFG, seed=0)
    emb = torch.randn(2, 4, 20, generator=gen)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    emb2 = torch.where(m[..., None], emb, torch.randn(emb.shape, generator=gen))
    a, b = txt(emb, m), txt(emb2, m)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-6)
    assert torch.allclose(den(xt, t, a), den(xt, t, b), atol=1e-5)


def test_dataset_encoder_class_slots_and_shot_padding(gen):
    enc = DatasetEncoder(ENC_CFG, seed=0).eval()
    x = torch.randn(2, 6, 4, 12, generator=gen)
    c = enc(x)
    perm = torch.randperm(6, generator=gen)
    cp = enc(x[:, perm])
    assert torch.allclose(cp.tokens, c.tokens[:, perm], atol=1e-5)  # class i stays in slot i
    assert torch.allclose(cp.pooled, c.pooled, atol=1e-5)
    shots = torch.randperm(4, generator=gen)
    assert torch.allclose(enc(x[:, :, shots]).tokens, c.tokens, atol=1e-5)  # shots are a set
    # Padded shots and padded classes change nothing real.
    shot_mask = torch.ones(2, 6, 4, dtype=torch.bool)
    shot_mask[0, 2, 1:] = False
    shot_mask[1, 5] = False  # class 5 of sample 1 is absent
    c1 = enc(x, shot_mask)
    x2 = torch.where(shot_mask[..., None], x, torch.randn(x.shape, generator=gen) * 10)
    c2 = enc(x2, shot_mask)
    assert c1.mask is not None and not c1.mask[1, 5] and c1.mask.sum() == 11
    assert torch.allclose(c1.tokens[c1.mask], c2.tokens[c1.mask], atol=1e-5)
    assert torch.allclose(c1.pooled, c2.pooled, atol=1e-5)
    # Sample 1 with its absent class dropped equals the 5-class encoding.
    c5 = enc(x[1:, :5])
    assert torch.allclose(c5.tokens[0], c1.tokens[1, :5], atol=1e-5)
    assert torch.allclose(c5.pooled[0], c1.pooled[1], atol=1e-5)


def test_vae_loss_ignores_padding(gen):
    vae = ChunkVAE(VAE_CFG, seed=0).eval()  # eval: no noise, z = mu
    x = torch.randn(3, 7, 64, generator=gen)
    mask = torch.ones(7, 64, dtype=torch.bool)
    mask[6, 20:] = False  # last token partly padded
    mask[5] = False  # a token that is all padding
    x = x * mask
    recon, mu, logvar = vae(x)
    w = mask.expand_as(x)
    want_rec = (recon - x).square()[w].mean()
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean(-1)[:, mask.any(-1)].mean()
    got = vae.loss(x, mask)
    assert torch.allclose(got["recon"], want_rec, rtol=1e-5)
    assert torch.allclose(got["kl"], kl, rtol=1e-5)
    assert torch.allclose(got["loss"], want_rec + VAE_CFG.kl_weight * kl, rtol=1e-5)
    assert torch.allclose(vae.loss(x, mask.expand(3, -1, -1))["loss"], got["loss"])
    # The decoder's outputs at padded entries get no gradient from the loss.
    vae.train()
    recon_grad = []

    def hook(module, inputs, out):
        out.register_hook(recon_grad.append)

    h = vae.decoder.register_forward_hook(hook)
    vae.loss(x, mask, generator=gen)["loss"].backward()
    h.remove()
    assert torch.equal(recon_grad[0][:, ~mask], torch.zeros_like(recon_grad[0][:, ~mask]))


def test_condition_helpers(gen):
    a = Condition(torch.randn(2, 3, E, generator=gen), torch.randn(2, E, generator=gen))
    b = Condition(
        torch.randn(1, 5, E, generator=gen),
        torch.randn(1, E, generator=gen),
        torch.tensor([[True, True, False, True, False]]),
    )
    c = Condition.cat([a, b])
    assert c.tokens.shape == (3, 5, E) and c.mask.tolist()[0] == [True] * 3 + [False] * 2
    r = a.repeat_interleave(3)
    assert r.batch_size == 6 and torch.equal(r.tokens[1], a.tokens[0])
    assert Condition.coerce((a.tokens, a.pooled)).batch_size == 2
    packed = b.pack(num_tokens=7)
    assert packed.shape == (1, 8, E + 1)
    u = Condition.coerce(packed)
    assert torch.equal(u.tokens[:, :5], b.tokens) and torch.equal(u.pooled, b.pooled)
    assert u.mask.tolist()[0] == [True, True, False, True, False, False, False]
    den = _randomize(LatentDenoiser(DEN_CFG, seed=0), gen)
    xt, t, *_ = _den_inputs(gen, B=1)
    assert torch.allclose(den(xt, t, packed), den(xt, t, b), atol=1e-6)
    with pytest.raises(DTypeError):
        Condition.coerce("text")


def test_drop_condition_and_null(gen):
    null = NullConditioner(E, num_tokens=2, seed=0)
    cond = Condition(torch.randn(8, 3, E, generator=gen), torch.randn(8, E, generator=gen))
    d = drop_condition(cond, 0.5, torch.Generator().manual_seed(0), null)
    assert d.tokens.shape == (8, 3, E)  # max(K, K_null): the null takes the first slots
    dropped = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < dropped.sum() < 8
    n = int(dropped.sum())
    # A dropped sample looks exactly like null(B) at sampling time, slots included.
    assert torch.equal(d.mask[dropped], torch.tensor([[True, True, False]]).expand(n, -1))
    assert torch.equal(d.tokens[dropped][:, :2], null.tokens.detach().expand(n, -1, -1))
    assert torch.equal(d.pooled[dropped], null.pooled.detach().expand(n, -1))
    assert torch.equal(d.tokens[~dropped], cond.tokens[~dropped])
    assert torch.equal(d.pooled[~dropped], cond.pooled[~dropped])
    assert bool(d.mask[~dropped].all())
    kept = drop_condition(cond, 0.0, gen, null)
    assert torch.equal(kept.tokens, cond.tokens) and bool(kept.mask.all())
    wide_null = NullConditioner(E, num_tokens=5, seed=0)
    w = drop_condition(cond, 1.0, gen, wide_null)
    assert w.tokens.shape == (8, 5, E) and bool(w.mask.all())
    with pytest.raises(ConfigError):
        drop_condition(cond, 1.5, gen)


# ----------------------------------------------------------------------------------------
# Backends inside the full denoiser.
# ----------------------------------------------------------------------------------------
def test_triton_and_torch_backends_agree_in_the_denoiser(gen):
    den = _randomize(LatentDenoiser(DEN_CFG, seed=0), gen)
    xt, t, cond, pos, kinds = _den_inputs(gen, B=2, T=37, K=5)
    real = torch.ones(2, 37, dtype=torch.bool)
    real[1, 30:] = False
    results = {}
    for backend in ("torch", "triton"):
        den.attention_backend = backend
        den.zero_grad()
        out = den(xt, t, cond, positions=pos, layer_kinds=kinds, mask=real)
        (out[real].square().mean()).backward()
        results[backend] = (
            out.detach(),
            {n: p.grad.clone() for n, p in den.named_parameters() if p.grad is not None},
        )
    den.attention_backend = None
    (o1, g1), (o2, g2) = results["torch"], results["triton"]
    assert torch.allclose(o1[real], o2[real], atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys() and len(g1) > 40
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-3), name


# ----------------------------------------------------------------------------------------
# Configs, files, determinism, bf16.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg", [VAE_CFG, DEN_CFG, ENC_CFG, TXT_CFG], ids=lambda c: type(c).__name__
)
def test_config_json_round_trip(cfg):
    again = type(cfg).from_json(cfg.to_json())
    assert again == cfg
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        type(cfg).from_dict({**cfg.to_dict(), "nope": 1})


def test_bad_configs():
    with pytest.raises(ConfigError, match="chunk_size"):
        ChunkVAEConfig(chunk_size=32)
    with pytest.raises(ConfigError, match="prediction_type"):
        LatentDenoiserConfig(prediction_type="score")
    with pytest.raises(ConfigError, match="num_heads"):
        LatentDenoiserConfig(hidden_dim=64, num_heads=3)
    with pytest.raises(ConfigError):
        ChunkVAEConfig.from_json("{not json")


@pytest.mark.parametrize(
    "cls,cfg",
    [
        (ChunkVAE, VAE_CFG),
        (LatentDenoiser, DEN_CFG),
        (DatasetEncoder, ENC_CFG),
        (TextConditioner, TXT_CFG),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_save_load_round_trip(cls, cfg, tmp_path, gen):
    net = _randomize(cls(cfg, seed=0), gen)
    path = tmp_path / "net.safetensors"
    save_module(net, path)
    assert os.listdir(tmp_path) == ["net.safetensors"]  # no temporary file left behind
    back = load_module(cls, path)
    assert back.config == cfg
    for (k, a), (k2, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    into = load_module(cls(cfg, seed=1), path)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), into.parameters()))


def test_bad_files(tmp_path):
    vae = ChunkVAE(VAE_CFG, seed=0)
    path = tmp_path / "vae.safetensors"
    save_module(vae, path)
    with pytest.raises(FileFormatError):
        load_module(ChunkVAE, tmp_path / "missing.safetensors")
    with pytest.raises(FileFormatError, match="holds a ChunkVAE"):
        load_module(TextConditioner, path)
    with pytest.raises(FileFormatError, match="shape"):
        load_module(ChunkVAE(ChunkVAEConfig(chunk_size=128, hidden_dim=64, num_blocks=1)), path)
    with pytest.raises(D2NWGError):
        load_module(ChunkVAE(ChunkVAEConfig(chunk_size=64, hidden_dim=64, num_blocks=2)), path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(FileFormatError):
        load_module(ChunkVAE, junk)


def test_determinism_given_a_seed(gen):
    for cls, cfg in ((ChunkVAE, VAE_CFG), (LatentDenoiser, DEN_CFG), (DatasetEncoder, ENC_CFG)):
        a, b, c = cls(cfg, seed=3), cls(cfg, seed=3), cls(cfg, seed=4)
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
        )
        assert not all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values())
        )
    vae = ChunkVAE(VAE_CFG, seed=0).train()
    x = torch.randn(2, 3, 64, generator=gen)
    l1 = vae.loss(x, generator=torch.Generator().manual_seed(5))["loss"]
    l2 = vae.loss(x, generator=torch.Generator().manual_seed(5))["loss"]
    assert torch.equal(l1, l2)


def test_bf16_autocast_runs(gen):
    vae = ChunkVAE(VAE_CFG, seed=0)
    den = _randomize(LatentDenoiser(DEN_CFG, seed=0), gen)
    enc = DatasetEncoder(ENC_CFG, seed=0)
    xt, t, _, pos, kinds = _den_inputs(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = vae.loss(torch.randn(2, 3, 64, generator=gen), generator=gen)
        cond = enc(torch.randn(2, 5, 3, 12, generator=gen))
        out = den(xt, t, cond, positions=pos, layer_kinds=kinds)
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = den(xt, t, cond.to(torch.float32), positions=pos, layer_kinds=kinds)
    # bf16 keeps 8 significant bits: each rounding is off by at most u = 2^-8 relative. Autocast
    # rounds the inputs of every matmul (and its output); the norms keep activations O(1) and
    # independent roundings add about in quadrature, so the output is off by a few u of its
    # scale: up to 4.4u of max|ref| over 2000 seeds of this test (median 2u). 8u is twice the
    # worst of those (the old bound, 10% + 0.05, was ~30u). Off by more: something ran in bf16
    # that must not, e.g. the timestep's sinusoidal phases (t * freq rounded, up to 2 rad off).
    bf16_u = 2.0**-8
    assert (out.float() - ref).abs().max() <= 8 * bf16_u * ref.abs().max()
    (out.float().square().mean() + losses["loss"]).backward()


# ----------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument(gen):
    den = LatentDenoiser(DEN_CFG, seed=0)
    xt, t, cond, pos, kinds = _den_inputs(gen)
    cases = [
        (lambda: den(xt[0], t, cond), ShapeError, "x_t"),
        (lambda: den(xt, t[:1], cond), ShapeError, "t must be"),
        (lambda: den(xt.long(), t, cond), DTypeError, "x_t"),
        (lambda: den(xt, t, cond, mask=torch.ones(2, 21)), DTypeError, "mask"),
        (lambda: den(xt, t, cond, mask=torch.ones(2, 20, dtype=torch.bool)), ShapeError, "mask"),
        (lambda: den(xt, t, cond, positions=pos[:5]), ShapeError, "positions"),
        (lambda: den(xt, t, cond, layer_kinds=kinds + 5), ShapeError, "layer_kinds"),
        (lambda: den(xt, t, (cond.tokens[..., :5], cond.pooled[..., :5])), ShapeError, "cond"),
        (lambda: Condition(cond.tokens, cond.pooled[:1]), ShapeError, "pooled"),
        (lambda: Condition(cond.tokens, cond.pooled, cond.mask.float()), DTypeError, "mask"),
        (lambda: ChunkVAE(VAE_CFG).encode(torch.randn(3, 63)), ShapeError, "chunks"),
        (lambda: ChunkVAE(VAE_CFG).decode(torch.randn(3, 9)), ShapeError, "latents"),
        (
            lambda: ChunkVAE(VAE_CFG).loss(
                torch.randn(2, 3, 64), torch.ones(4, 64, dtype=torch.bool)
            ),
            ShapeError,
            "mask",
        ),
        (lambda: DatasetEncoder(ENC_CFG)(torch.randn(2, 3, 12)), ShapeError, "x must be"),
        (
            lambda: DatasetEncoder(ENC_CFG)(
                torch.randn(2, 3, 4, 12), torch.ones(2, 3, 5, dtype=torch.bool)
            ),
            ShapeError,
            "shot_mask",
        ),
        (lambda: TextConditioner(TXT_CFG)(torch.randn(2, 4, 21)), ShapeError, "text embeddings"),
    ]
    for fn, err, word in cases:
        with pytest.raises(err, match=word) as info:
            fn()
        assert isinstance(info.value, D2NWGError)
    unconditional = LatentDenoiser(
        LatentDenoiserConfig(latent_dim=8, hidden_dim=32, depth=1, num_heads=2)
    )
    with pytest.raises(ConfigError, match="unconditional"):
        unconditional(xt, t, cond)
    assert unconditional(xt, t).shape == xt.shape


def test_sample_guides_the_denoiser_with_condition_objects():
    """d2nwg.sample takes Condition objects for cond/uncond (packed to one batched call)."""
    import d2nwg

    torch.manual_seed(0)
    den = d2nwg.LatentDenoiser(
        d2nwg.LatentDenoiserConfig(latent_dim=8, cond_dim=16, hidden_dim=32, depth=1, num_heads=2)
    )
    with torch.no_grad():  # adaLN-Zero starts at zero output: move off it so guidance matters
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    B, T = 2, 5
    cond = d2nwg.Condition(
        torch.randn(B, 3, 16), torch.randn(B, 16), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    )
    null = den.null_condition(1)
    sched = d2nwg.NoiseSchedule.linear(100)
    x_T = torch.randn(B, T, 8)
    kw = dict(sampler="ddim", steps=4, guidance_scale=3.0)
    with torch.no_grad():
        guided = d2nwg.sample(den, x_T, sched, cond=cond, uncond=null, **kw)
        K = max(cond.tokens.shape[1], null.tokens.shape[1])
        packed = d2nwg.sample(den, x_T, sched, cond=cond.pack(K), uncond=null.pack(K), **kw)
        plain = d2nwg.sample(den, x_T, sched, sampler="ddim", steps=4, cond=cond)
    assert torch.equal(guided, packed)
    assert not torch.allclose(guided, plain)
