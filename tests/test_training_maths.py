"""Training's arithmetic pinned to values worked out by hand: the learning-rate schedule (and
the rate the loop really sets), the EMA and its warm-up, the VAE and diffusion losses with
their padding masks, the latent scale, condition dropout, the (model, window) pairs of a
diffusion step, and which checkpoint a resume starts from.

Every expected value below is a literal or an elementary expression written out here, never
a call of the code under test; a plausible slip in a formula (a sign, an off-by-one, a mean
over padding) fails one of these tests."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from d2nwg.errors import ConfigError, NonFiniteError
from d2nwg.generator import stages
from d2nwg.generator.config import D2NWGConfig
from d2nwg.generator.fitting import resume_state
from d2nwg.generator.networks import ConditionalDenoiser
from d2nwg.nn.conditioners import Condition, NullConditioner, drop_condition
from d2nwg.nn.denoiser import diffusion_loss
from d2nwg.nn.vae import ChunkVAE, ChunkVAEConfig
from d2nwg.schedule import NoiseSchedule
from d2nwg.training import (
    EMA,
    Checkpoints,
    DistContext,
    LoopConfig,
    LossLog,
    Stage,
    TrainingRun,
    ema_decay,
    lr_factor,
    train_stage,
)


# ----------------------------------------------------------------------------------------
# The learning-rate schedule.
# ----------------------------------------------------------------------------------------
def test_lr_warmup_is_linear_and_reaches_one_on_its_last_step():
    # (step + 1) / warmup with warmup 4: 1/4, 2/4, 3/4, 4/4
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # warmup 2: 0.5, then the cosine starts at its top (p = 0): 1.0
    assert [lr_factor(s, 10, 2) for s in range(3)] == [0.5, 1.0, 1.0]


def test_lr_cosine_decay_by_hand():
    # total 10, warmup 4: p = (step - 4) / 6
    assert lr_factor(4, 10, 4) == pytest.approx(1.0, abs=1e-15)  # p = 0
    # p = 1/2: cos = 0, so exactly (1 + final) / 2
    assert lr_factor(7, 10, 4) == pytest.approx(0.55, abs=1e-15)
    assert lr_factor(7, 10, 4, final=0.0) == pytest.approx(0.5, abs=1e-15)
    assert lr_factor(7, 10, 4, final=0.3) == pytest.approx(0.65, abs=1e-15)
    # p = 1/6: cos(pi / 6) = sqrt(3) / 2
    assert lr_factor(5, 10, 4) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(3) / 2), abs=1e-15)
    # p = 2/3: cos(2 pi / 3) = -1/2 -> 0.1 + 0.9 * 0.25
    assert lr_factor(8, 10, 4) == pytest.approx(0.325, abs=1e-15)
    # the end of the schedule is ``final``, and it stays there past the total
    for step in (10, 11, 25):
        assert lr_factor(step, 10, 4) == pytest.approx(0.1, abs=1e-15)
        assert lr_factor(step, 10, 4, final=0.25) == pytest.approx(0.25, abs=1e-15)


def test_lr_without_warmup():
    assert lr_factor(0, 8, 0) == 1.0  # p = 0: no warm-up step, no division by zero
    assert lr_factor(4, 8, 0) == pytest.approx(0.55, abs=1e-15)  # p = 1/2
    assert lr_factor(2, 8, 0) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)), abs=1e-15)
    assert lr_factor(8, 8, 0) == pytest.approx(0.1, abs=1e-15)


# ----------------------------------------------------------------------------------------
# EMA.
# ----------------------------------------------------------------------------------------
def test_ema_decay_warmup_and_cap():
    # (1 + k) / (10 + k) for k = 1, 2, 3, ...
    assert [ema_decay(0.999, k) for k in (1, 2, 3, 4)] == [2 / 11, 3 / 12, 4 / 13, 5 / 14]
    assert ema_decay(0.999, 90) == 91 / 100
    # capped at the configured decay: 81 / 90 = 0.9 is where the warm-up reaches 0.9
    assert ema_decay(0.9, 79) == 80 / 89
    assert ema_decay(0.9, 81) == 0.9
    assert ema_decay(0.9, 10_000) == 0.9
    assert ema_decay(0.2, 1) == 2 / 11  # warm-up below the cap
    assert ema_decay(0.2, 2) == 0.2  # 3 / 12 = 0.25 > cap
    assert ema_decay(0.0, 1) == 0.0  # decay 0: the shadow is the weights


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize(
    "decay, want",
    [
        # d_k = (1 + k) / (10 + k): 2/11, 3/12, 4/13
        # s1 = 9/11 * 1 = 9/11; s2 = 1/4 * 9/11 + 3/4 * 2 = 75/44;
        # s3 = 4/13 * 75/44 + 9/13 * (-1) = -24/143
        (0.999, [9 / 11, 75 / 44, -24 / 143]),
        # capped at 0.2 from k = 2: s2 = 0.2 * 9/11 + 0.8 * 2 = 97/55;
        # s3 = 0.2 * 97/55 - 0.8 = -123/275
        (0.2, [9 / 11, 97 / 55, -123 / 275]),
    ],
)
def test_ema_update_follows_the_hand_recurrence(decay, want):
    m = _Scalar()
    ema = EMA(m, decay)
    assert ema.num_updates == 0 and float(ema.shadow["w"]) == 0.0
    for k, (w, s) in enumerate(zip((1.0, 2.0, -1.0), want), start=1):
        with torch.no_grad():
            m.w.fill_(w)
        ema.update(m)
        assert ema.num_updates == k
        assert float(ema.shadow["w"]) == pytest.approx(s, abs=1e-13)
        assert float(m.w.detach()) == w  # updating reads the weights, never writes them
    ema.copy_to(m)
    assert float(m.w.detach()) == pytest.approx(want[-1], abs=1e-13)


def test_ema_averages_floating_buffers_and_leaves_integer_ones():
    bn = nn.BatchNorm1d(2)
    ema = EMA(bn, 0.999)
    assert sorted(ema.shadow) == ["bias", "running_mean", "running_var", "weight"]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([11.0, -22.0]))
        bn.weight.copy_(torch.tensor([3.0, 5.0]))
    bn.num_batches_tracked.fill_(7)
    ema.update(bn)  # d = 2/11: shadow = 2/11 * old + 9/11 * new
    torch.testing.assert_close(ema.shadow["running_mean"], torch.tensor([9.0, -18.0]))
    torch.testing.assert_close(
        ema.shadow["weight"], torch.tensor([2 / 11 + 27 / 11, 2 / 11 + 45 / 11])
    )
    torch.testing.assert_close(ema.shadow["running_var"], torch.ones(2))
    bn.num_batches_tracked.fill_(9)
    ema.copy_to(bn)
    assert int(bn.num_batches_tracked) == 9  # the integer buffer is left as it was
    torch.testing.assert_close(bn.running_mean, torch.tensor([9.0, -18.0]))


def test_ema_state_dict_round_trip_restores_the_count_and_the_shadow():
    m = _Scalar()
    ema = EMA(m, 0.999)
    for w in (1.0, 2.0):
        with torch.no_grad():
            m.w.fill_(w)
        ema.update(m)
    saved = {"num_updates": ema.state_dict()["num_updates"],
             "shadow": {k: v.clone() for k, v in ema.state_dict()["shadow"].items()}}  # fmt: skip
    assert saved["num_updates"] == 2
    assert float(saved["shadow"]["w"]) == pytest.approx(75 / 44, abs=1e-13)

    fresh = _Scalar()
    other = EMA(fresh, 0.999)
    other.load_state_dict(saved)
    assert other.num_updates == 2
    assert float(other.shadow["w"]) == pytest.approx(75 / 44, abs=1e-13)
    # the next update is the third: d = 4/13 (a count left at 0 would use 2/11)
    with torch.no_grad():
        fresh.w.fill_(-1.0)
    other.update(fresh)
    assert float(other.shadow["w"]) == pytest.approx(-24 / 143, abs=1e-13)


def test_ema_rejects_a_decay_outside_zero_one():
    for decay in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError):
            EMA(_Scalar(), decay)


# ----------------------------------------------------------------------------------------
# The VAE loss.
# ----------------------------------------------------------------------------------------
C = 64  # the smallest chunk a ChunkVAE takes


def _vae(kl_weight=0.5, input_noise=0.0, latent_noise=0.0) -> ChunkVAE:
    cfg = ChunkVAEConfig(chunk_size=C, latent_dim=2, hidden_dim=4, num_blocks=0,
                         kl_weight=kl_weight, input_noise=input_noise,
                         latent_noise=latent_noise)  # fmt: skip
    return ChunkVAE(cfg, seed=0)


class _Const(nn.Module):
    """A decoder that records its input and returns a fixed reconstruction."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.detach().clone())
        return self.out.clone()


def _stubbed(vae: ChunkVAE, mu, logvar, recon):
    """``vae`` with encode -> (mu, logvar) and decode -> recon; records what each saw."""
    seen_x: list[torch.Tensor] = []

    def encode(x):
        seen_x.append(x.detach().clone())
        return mu, logvar

    vae.encode = encode
    vae.decoder = _Const(recon)
    return seen_x


def _vae_case():
    """One model of three tokens: token 0 has 3 real entries, token 1 has 1, token 2 is all
    padding (its reconstruction error and its KL are huge, and must not count)."""
    x = torch.zeros(1, 3, C)
    mask = torch.zeros(3, C, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 5] = True
    recon = torch.full((1, 3, C), 100.0)  # wrong everywhere: padding must not count
    recon[0, 0, :3] = torch.tensor([1.0, 2.0, 3.0])
    recon[0, 1, 5] = -2.0
    mu = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [50.0, 50.0]]])
    logvar = torch.tensor([[[0.0, math.log(4.0)], [0.0, 0.0], [5.0, 5.0]]])
    return x, mask, recon, mu, logvar


def test_vae_loss_by_hand_over_real_entries_and_real_tokens():
    x, mask, recon, mu, logvar = _vae_case()
    vae = _vae(kl_weight=0.5).eval()  # eval: z = mu, no noise
    _stubbed(vae, mu, logvar, recon)
    out = vae.loss(x, mask)
    # reconstruction: squared errors 1, 4, 9 and 4 over the 4 real entries
    assert float(out["recon"]) == pytest.approx(18 / 4, abs=1e-6)
    # KL per token: 0.5 * mean over d of (mu^2 + e^logvar - 1 - logvar)
    # token 0: d0: 1 + 1 - 1 - 0 = 1; d1: 4 + 4 - 1 - ln 4 = 7 - ln 4 -> (8 - ln 4) / 4
    # token 1: d0: 0; d1: 1 + 1 - 1 = 1 -> 0.5 * 1/2 = 1/4; token 2: padding
    kl = ((8 - math.log(4.0)) / 4 + 1 / 4) / 2
    assert float(out["kl"]) == pytest.approx(kl, abs=1e-6)
    assert float(out["loss"]) == pytest.approx(18 / 4 + 0.5 * kl, abs=1e-6)


def test_vae_loss_ignores_padded_inputs_and_outputs():
    x, mask, recon, mu, logvar = _vae_case()
    vae = _vae().eval()
    _stubbed(vae, mu, logvar, recon)
    base = float(vae.loss(x, mask)["loss"])
    x2 = x.clone()
    x2[0, 0, 10] = 7.0  # a padded entry of a real token
    x2[0, 2, :] = -3.0  # a whole padded token
    assert float(vae.loss(x2, mask)["loss"]) == base
    recon2 = recon.clone()
    recon2[0, 1, 0] = -55.0
    recon2[0, 2, :] = 1e4
    _stubbed(vae, mu, logvar, recon2)
    assert float(vae.loss(x, mask)["loss"]) == base
    # ... while a real entry does count: (1 - 0)^2 -> (1 - 3)^2 adds 3 / 4 entries
    x3 = x.clone()
    x3[0, 0, 0] = 3.0
    _stubbed(vae, mu, logvar, recon)
    assert float(vae.loss(x3, mask)["recon"]) == pytest.approx(21 / 4, abs=1e-6)


def test_vae_loss_mask_of_a_batch_and_no_mask():
    x, mask, recon, mu, logvar = _vae_case()
    vae = _vae(kl_weight=2.0).eval()
    # two models: the second has only token 1's entry real (an [N, T, C] mask)
    x2, recon2 = torch.cat([x, x]), torch.cat([recon, recon])
    mu2, logvar2 = torch.cat([mu, mu]), torch.cat([logvar, logvar])
    m2 = torch.stack([mask, torch.zeros_like(mask)])
    m2[1, 1, 5] = True
    _stubbed(vae, mu2, logvar2, recon2)
    out = vae.loss(x2, m2)
    # 5 real entries: 1 + 4 + 9 + 4 + 4; 3 real tokens: token 0, token 1 twice
    assert float(out["recon"]) == pytest.approx(22 / 5, abs=1e-6)
    kl = ((8 - math.log(4.0)) / 4 + 2 * (1 / 4)) / 3
    assert float(out["kl"]) == pytest.approx(kl, abs=1e-6)
    assert float(out["loss"]) == pytest.approx(22 / 5 + 2.0 * kl, abs=1e-6)
    # no mask: the plain means over every entry and every token
    _stubbed(vae, mu, logvar, recon)
    out = vae.loss(x, None)
    want_rec = (1 + 4 + 9 + 4 + 100**2 * (3 * C - 4)) / (3 * C)
    kl_tok2 = 0.5 * (2500 + math.exp(5) - 1 - 5)
    want_kl = ((8 - math.log(4.0)) / 4 + 1 / 4 + kl_tok2) / 3
    assert float(out["recon"]) == pytest.approx(want_rec, rel=1e-6)
    assert float(out["kl"]) == pytest.approx(want_kl, rel=1e-6)


def test_vae_training_noise_by_hand():
    """In training mode: input noise on real entries only (drawn first), then the
    reparameterized sample mu + exp(logvar / 2) eps, then latent noise; the reconstruction is
    compared with the clean input."""
    x, mask, _, mu, logvar = _vae_case()
    x = torch.arange(3 * C, dtype=torch.float32).reshape(1, 3, C) / 100
    vae = _vae(input_noise=0.01, latent_noise=0.1).train()
    seen_x = _stubbed(vae, mu, logvar, x.clone())  # decodes to the clean input exactly
    out = vae.loss(x, mask, generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    n_in = torch.randn(1, 3, C, generator=g)
    eps = torch.randn(1, 3, 2, generator=g)
    n_lat = torch.randn(1, 3, 2, generator=g)
    torch.testing.assert_close(seen_x[0], x + 0.01 * n_in * mask, rtol=0, atol=1e-7)
    assert torch.equal(seen_x[0][0, 2], x[0, 2])  # padding gets no noise
    std = torch.tensor([[[1.0, 2.0], [1.0, 1.0], [math.exp(2.5), math.exp(2.5)]]])
    torch.testing.assert_close(vae.decoder.seen[0], mu + std * eps + 0.1 * n_lat)
    assert float(out["recon"]) == 0.0  # against the clean x, not the noisy one


# ----------------------------------------------------------------------------------------
# The diffusion loss.
# ----------------------------------------------------------------------------------------
def _schedule() -> NoiseSchedule:
    # alpha_bar: 0.64, 0.64 * 0.5625 = 0.36 -> (alpha, sigma) = (0.8, 0.6) and (0.6, 0.8)
    return NoiseSchedule.from_betas([0.36, 0.4375])


# two samples of three tokens, width 2; sample 0 at t = 0, sample 1 at t = 1.
# The real tokens are (0, 0), (0, 1) and (1, 0); the 9s and 7s are padding.
X0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], [[2.0, 1.0], [9.0, 9.0], [9.0, 9.0]]])
NOISE = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [7.0, 7.0]], [[1.0, -1.0], [7.0, 7.0], [7.0, 7.0]]])
T_ = torch.tensor([0, 1])
MASK = torch.tensor([[True, True, False], [True, False, False]])
# The targets of the real tokens, by hand:
TARGETS = {
    "epsilon": [[0.0, 1.0], [1.0, 0.0], [1.0, -1.0]],
    "sample": [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]],
    # v = alpha eps - sigma x0: 0.8 [0, 1] - 0.6 [1, 0]; 0.8 [1, 0] - 0.6 [0, 1];
    # 0.6 [1, -1] - 0.8 [2, 1]
    "v": [[-0.6, 0.8], [0.8, -0.6], [-1.0, -1.4]],
}


class _Ones:
    """A model that predicts 1 everywhere and records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, x_t, t, cond, **kw):
        self.calls.append((x_t.clone(), t.clone(), cond, kw))
        return torch.ones_like(x_t)


def _sq_err_from_one(v) -> float:
    return sum((1.0 - e) ** 2 for e in v) / len(v)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_diffusion_loss_by_hand_mean_over_real_tokens(prediction_type):
    model = _Ones()
    loss = diffusion_loss(model, X0, _schedule(), T_, NOISE, None,
                          prediction_type=prediction_type, mask=MASK)  # fmt: skip
    # mean over the width of each real token, then over the 3 real tokens of the batch
    # (not over each sample first: sample 0 has 2 real tokens, sample 1 has 1)
    want = sum(_sq_err_from_one(v) for v in TARGETS[prediction_type]) / 3
    assert float(loss) == pytest.approx(want, abs=1e-6)
    ((x_t, t, cond, kw),) = model.calls
    # x_t = alpha x0 + sigma eps: 0.8 [1, 0] + 0.6 [0, 1]; 0.8 [0, 1] + 0.6 [1, 0];
    # 0.6 [2, 1] + 0.8 [1, -1]
    torch.testing.assert_close(x_t[0, :2], torch.tensor([[0.8, 0.6], [0.6, 0.8]]))
    torch.testing.assert_close(x_t[1, 0], torch.tensor([2.0, -0.2]))
    assert t.tolist() == [0, 1] and cond is None
    assert torch.equal(kw["mask"], MASK)  # the model sees the padding mask too


def test_diffusion_loss_padding_does_not_count():
    base = float(diffusion_loss(_Ones(), X0, _schedule(), T_, NOISE, prediction_type="v",
                                mask=MASK))  # fmt: skip
    x0, noise = X0.clone(), NOISE.clone()
    x0[~MASK] = -123.0
    noise[~MASK] = 45.0
    again = diffusion_loss(_Ones(), x0, _schedule(), T_, noise, prediction_type="v", mask=MASK)
    assert float(again) == pytest.approx(base, abs=1e-6)


def test_diffusion_loss_without_mask_and_with_a_shared_mask():
    # no mask: the mean over all 6 tokens; padded tokens of epsilon: (1 - 7)^2 = 36
    eps = TARGETS["epsilon"]
    want = (sum(_sq_err_from_one(v) for v in eps) + 3 * 36) / 6
    loss = diffusion_loss(_Ones(), X0, _schedule(), T_, NOISE, prediction_type="epsilon")
    assert float(loss) == pytest.approx(want, abs=1e-5)
    # a [T] mask shared by the batch: tokens 0 and 1 of both samples
    shared = torch.tensor([True, True, False])
    loss = diffusion_loss(_Ones(), X0, _schedule(), T_, NOISE, prediction_type="epsilon",
                          mask=shared)  # fmt: skip
    want = (sum(_sq_err_from_one(v) for v in eps) + 36) / 4
    assert float(loss) == pytest.approx(want, abs=1e-5)


class _StubDenoiser(nn.Module):
    def __init__(self, prediction_type: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(prediction_type=prediction_type)
        self.null = None
        self.seen: dict = {}

    def forward(self, x_t, t, cond, **kw):
        self.seen = kw
        return torch.ones_like(x_t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_stage_two_loss_uses_the_config_prediction_type_and_the_window_mask(prediction_type):
    den = _StubDenoiser(prediction_type)
    model = ConditionalDenoiser(den, None)
    positions = torch.zeros(2, 3, dtype=torch.long)
    loss = model(X0, T_, NOISE, None, _schedule(), 0.5, torch.Generator().manual_seed(0),
                 positions=positions, layer_kinds=None, mask=MASK)  # fmt: skip
    want = sum(_sq_err_from_one(v) for v in TARGETS[prediction_type]) / 3
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert torch.equal(den.seen["mask"], MASK) and den.seen["positions"] is positions


# ----------------------------------------------------------------------------------------
# The latent scale.
# ----------------------------------------------------------------------------------------
class _StubVAE(nn.Module):
    def __init__(self, mu: torch.Tensor) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.mu = mu

    def encode_mean(self, x, max_batch=None):
        return self.mu.clone()


@pytest.mark.parametrize(
    "mu, scale",
    [
        ([[[1.0, 1.0], [1.0, 3.0]]], 1 / math.sqrt(3)),  # mean square (1 + 1 + 1 + 9) / 4 = 3
        ([[[-2.0, 2.0]], [[2.0, -2.0]]], 0.5),  # mean square 4
        ([[[0.0, 0.0], [0.0, 0.5]]], 4.0),  # mean square 0.25 / 4 = 1/16
    ],
)
def test_latent_scale_is_one_over_root_mean_square(mu, scale):
    mu = torch.tensor(mu)
    latents, got = stages.encode_latents(_StubVAE(mu), torch.zeros(*mu.shape[:2], C), DistContext())
    assert got == pytest.approx(scale, rel=1e-12)
    torch.testing.assert_close(latents, mu * scale, rtol=0, atol=1e-7)
    assert latents.dtype == torch.float32


def test_latent_scale_of_nan_latents_is_an_error():
    mu = torch.tensor([[[1.0, float("nan")]]])
    with pytest.raises(NonFiniteError, match="mean square"):
        stages.encode_latents(_StubVAE(mu), torch.zeros(1, 1, C), DistContext())


def test_latent_scale_of_all_zero_latents_is_an_error():
    with pytest.raises(NonFiniteError, match="mean square"):
        stages.encode_latents(_StubVAE(torch.zeros(2, 3, 2)), torch.zeros(2, 3, C), DistContext())


# ----------------------------------------------------------------------------------------
# Condition dropout.
# ----------------------------------------------------------------------------------------
def _cond(B=6, K=2, E=3) -> Condition:
    tokens = torch.arange(B * K * E, dtype=torch.float32).reshape(B, K, E) + 1
    pooled = -torch.arange(B * E, dtype=torch.float32).reshape(B, E) - 1
    return Condition(tokens, pooled)


def test_condition_dropout_replays_the_generator_draws():
    cond, p, seed = _cond(), 0.4, 5
    null = NullConditioner(3, num_tokens=1, seed=0)
    out = drop_condition(cond, p, torch.Generator().manual_seed(seed), null)
    # by hand: one uniform draw per row, dropped where it is below p
    u = torch.rand(6, generator=torch.Generator().manual_seed(seed))
    drop = (u < p).tolist()
    assert 0 < sum(drop) < 6, "the seed must drop some rows and keep others"
    nt, npool = null.tokens.detach(), null.pooled.detach()
    for b, dropped in enumerate(drop):
        if dropped:  # the null token in slot 0, slot 1 masked out, the null pooled vector
            assert torch.equal(out.tokens[b, 0], nt[0])
            assert torch.equal(out.tokens[b, 1], torch.zeros(3))
            assert out.mask[b].tolist() == [True, False]
            assert torch.equal(out.pooled[b], npool)
        else:
            assert torch.equal(out.tokens[b], cond.tokens[b])
            assert out.mask[b].tolist() == [True, True]
            assert torch.equal(out.pooled[b], cond.pooled[b])
    # without a null condition: no tokens and a zero pooled vector for dropped rows
    out = drop_condition(cond, p, torch.Generator().manual_seed(seed), None)
    for b, dropped in enumerate(drop):
        assert out.mask[b].tolist() == ([False, False] if dropped else [True, True])
        want = torch.zeros(3) if dropped else cond.pooled[b]
        assert torch.equal(out.pooled[b], want)


def test_condition_dropout_probability_zero_and_one():
    cond = _cond()
    null = NullConditioner(3, num_tokens=1, seed=0)
    kept = drop_condition(cond, 0.0, torch.Generator().manual_seed(1), null)
    assert torch.equal(kept.tokens, cond.tokens) and torch.equal(kept.pooled, cond.pooled)
    assert kept.mask.all()
    dropped = drop_condition(cond, 1.0, torch.Generator().manual_seed(1), null)
    assert torch.equal(dropped.pooled, null.pooled.detach().expand(6, 3))
    assert dropped.mask.tolist() == [[True, False]] * 6


# ----------------------------------------------------------------------------------------
# (model, window) pairs of a diffusion step.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch_size, window_batch, models, windows, want",
    [
        (64, 0, 10, 1, 10),  # fewer models than the batch: every model once
        (8, 0, 10, 1, 8),  # one window: batch_size models
        (8, 5, 10, 1, 8),  # window_batch only applies to windowed generators
        (8, 0, 10, 3, 24),  # 8 models x their 3 windows
        (8, 0, 10, 6, 32),  # 8 models x at most 4 draws each
        (64, 0, 5, 6, 20),  # 5 models x 4
        (64, 0, 5, 2, 10),  # 5 models x 2
        (8, 7, 10, 6, 7),  # window_batch set: exactly that
        (8, 100, 3, 2, 100),
    ],
)
def test_window_pairs(batch_size, window_batch, models, windows, want):
    c = D2NWGConfig(batch_size=batch_size, window_batch=window_batch)
    assert stages.window_pairs(c, models, windows) == want


def test_vae_stage_draws_real_tokens_with_their_own_mask_rows(monkeypatch):
    """Stage 1's batch: chunks drawn uniformly from the tokens that hold a real entry, each
    with the mask row of its position in the model."""
    captured = {}
    monkeypatch.setattr(stages, "train_stage", lambda run, st, module, loss_fn, state: captured
                        .update(loss_fn=loss_fn))  # fmt: skip
    M, T = 2, 3
    tokens = torch.arange(M * T * C, dtype=torch.float32).reshape(M, T, C)
    mask = torch.zeros(T, C, dtype=torch.bool)
    mask[0, :2] = True
    mask[2, 7] = True  # token 1 is all padding: never drawn
    c = D2NWGConfig(chunk_size=C, vae_batch=8)
    stages.train_vae(_run(None), c, _vae(), tokens, mask)
    seen = []
    captured["loss_fn"](lambda x, m, g: seen.append((x, m)) or torch.zeros(()),
                        torch.Generator().manual_seed(4))  # fmt: skip
    ((x, m),) = seen
    # by hand: the real flat tokens are model 0's 0, 2 and model 1's 0, 2 -> 0, 2, 3, 5
    draws = torch.randint(4, (8,), generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([0, 2, 3, 5])[draws]
    assert torch.equal(x, tokens.reshape(-1, C)[idx])
    assert torch.equal(m, mask[idx % 3])


# ----------------------------------------------------------------------------------------
# Checkpoints and resume.
# ----------------------------------------------------------------------------------------
def _touch(directory, *names):
    os.makedirs(directory, exist_ok=True)
    for name in names:
        with open(os.path.join(directory, name), "w") as f:
            f.write("x")


def test_latest_path_picks_the_latest_stage_then_the_highest_step(tmp_path):
    ck = Checkpoints(tmp_path)
    assert ck.latest_path() is None and ck.latest() is None
    _touch(ck.directory, "0-vae-00000500.safetensors", "1-diffusion-00000100.safetensors",
           "1-diffusion-00000050.safetensors", ".tmp-xyz.safetensors",
           "1-diffusion-99.safetensors", "9-zzz-00000001.safetensors.bak", "notes.txt")  # fmt: skip
    assert os.path.basename(ck.latest_path()) == "1-diffusion-00000100.safetensors"
    # stage indices compare as numbers, steps too
    _touch(ck.directory, "2-vae-00000009.safetensors", "10-vae-00000001.safetensors")
    assert os.path.basename(ck.latest_path()) == "10-vae-00000001.safetensors"


def _state(stage: str, step: int, world_size: int = 1) -> dict:
    return {"stage": stage, "step": step, "world_size": world_size,
            "w": torch.full((2,), float(step))}  # fmt: skip


def _names(ck: Checkpoints) -> list[str]:
    return sorted(os.listdir(ck.directory))


def test_save_keeps_the_newest_two_and_clear_removes_them(tmp_path):
    ck = Checkpoints(tmp_path)
    _touch(ck.directory, ".tmp-abc.safetensors", "notes.txt")
    ck.save(0, "vae", 500, _state("vae", 500))
    ck.save(1, "diffusion", 50, _state("diffusion", 50))
    assert _names(ck) == [".tmp-abc.safetensors", "0-vae-00000500.safetensors",
                          "1-diffusion-00000050.safetensors", "notes.txt"]  # fmt: skip
    ck.save(1, "diffusion", 100, _state("diffusion", 100))
    # the newest two by (stage, step): the VAE's goes, the stray files stay
    assert _names(ck) == [".tmp-abc.safetensors", "1-diffusion-00000050.safetensors",
                          "1-diffusion-00000100.safetensors", "notes.txt"]  # fmt: skip
    state = ck.latest()
    assert state["stage"] == "diffusion" and state["step"] == 100
    assert state["w"].tolist() == [100.0, 100.0]

    three = Checkpoints(tmp_path / "three", keep=3)
    for step in (1, 2, 3, 4, 5):
        three.save(1, "diffusion", step, _state("diffusion", step))
    assert _names(three) == [f"1-diffusion-0000000{s}.safetensors" for s in (3, 4, 5)]

    ck.remove_partial()
    assert _names(ck) == ["1-diffusion-00000050.safetensors",
                          "1-diffusion-00000100.safetensors", "notes.txt"]  # fmt: skip
    _touch(ck.directory, ".tmp-def.safetensors")
    ck.clear()
    assert _names(ck) == ["notes.txt"]


def _run(out) -> TrainingRun:
    return TrainingRun(torch.device("cpu"), DistContext(),
                       Checkpoints(out) if out is not None else None,
                       LossLog(out, True), False, LoopConfig())  # fmt: skip


def _with_checkpoints(tmp_path) -> TrainingRun:
    run = _run(tmp_path)
    run.ckpt.save(0, "vae", 500, _state("vae", 500))
    run.ckpt.save(1, "diffusion", 100, _state("diffusion", 100))
    _touch(run.ckpt.directory, ".tmp-xyz.safetensors")
    run.log.write(stage="vae", step=500, loss=1.0)
    return run


@pytest.mark.parametrize("resume", [True, "auto"])
def test_resume_returns_the_newest_checkpoint(tmp_path, resume):
    run = _with_checkpoints(tmp_path)
    state = resume_state(run, resume)
    assert state["stage"] == "diffusion" and state["step"] == 100
    assert state["w"].tolist() == [100.0, 100.0]
    # the partial file goes, the checkpoints and the log stay
    assert _names(run.ckpt) == ["0-vae-00000500.safetensors",
                                "1-diffusion-00000100.safetensors"]  # fmt: skip
    assert run.log.read() == [{"stage": "vae", "step": 500, "loss": 1.0}]


def test_a_fresh_run_clears_the_earlier_checkpoints_and_log(tmp_path):
    run = _with_checkpoints(tmp_path)
    assert resume_state(run, False) is None
    assert _names(run.ckpt) == [] and run.log.read() == []
    assert not os.path.exists(run.log.path)


def test_auto_resume_without_a_checkpoint_starts_fresh(tmp_path):
    run = _run(tmp_path)
    run.log.write(stage="vae", step=25, loss=2.0)  # a log without a checkpoint
    _touch(run.ckpt.directory, ".tmp-xyz.safetensors")
    assert resume_state(run, "auto") is None
    assert run.log.read() == [] and _names(run.ckpt) == []


def test_resume_refuses_another_world_size(tmp_path):
    run = _run(tmp_path)
    run.ckpt.save(1, "diffusion", 100, _state("diffusion", 100, world_size=2))
    with pytest.raises(ConfigError, match="2 processes"):
        resume_state(run, True)


# ----------------------------------------------------------------------------------------
# What the training loop really does each step.
# ----------------------------------------------------------------------------------------
class _Vec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def _train(tmp_path, steps, lr, warmup, grad_clip=1.0):
    """train_stage on a 2-vector with loss w . [3, 4] (gradient [3, 4], norm 5); the learning
    rate and gradient each optimizer step saw, and the log rows."""
    seen = []

    def hook(opt, args, kwargs):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["params"][0].grad.clone()))

    run = TrainingRun(torch.device("cpu"), DistContext(), None, LossLog(tmp_path, True), False,
                      LoopConfig(warmup=warmup, grad_clip=grad_clip, log_every=1))  # fmt: skip
    module = _Vec()
    handle = register_optimizer_step_pre_hook(hook)
    try:
        train_stage(run, Stage("s", 0, steps, lr), module,
                    lambda m, g: (m.w * torch.tensor([3.0, 4.0])).sum())  # fmt: skip
    finally:
        handle.remove()
    return seen, run.log.read()


def test_trainer_sets_base_lr_times_the_schedule_each_step(tmp_path):
    # 10 steps, warmup fraction 0.29: int(2.9) = 2 warm-up steps (rounding would give 3)
    seen, rows = _train(tmp_path, 10, 0.5, 0.29)
    want = [0.25, 0.5]  # 0.5 * 1/2, 0.5 * 2/2
    want += [0.5 * (0.1 + 0.45 * (1 + math.cos(math.pi * (k - 2) / 8))) for k in range(2, 10)]
    assert want[6] == pytest.approx(0.275)  # p = 1/2: 0.5 * 0.55
    assert [lr for lr, _ in seen] == pytest.approx(want, abs=1e-15)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["lr"] for r in rows] == pytest.approx(want, abs=1e-15)
    assert [r["loss"] for r in rows][0] == 0.0  # w starts at 0
    json.dumps(rows)  # the log holds plain numbers


def test_trainer_without_warmup_and_with_warmup_under_one_step(tmp_path):
    for warmup in (0.0, 0.09):  # int(0.9) = 0: no warm-up
        seen, _ = _train(tmp_path / str(warmup), 4, 2.0, warmup)
        # p = k / 4: 2 * (0.1 + 0.45 (1 + cos(pi k / 4)))
        want = [2.0, 2 * (0.1 + 0.45 * (1 + math.sqrt(0.5))), 2 * 0.55,
                2 * (0.1 + 0.45 * (1 - math.sqrt(0.5)))]  # fmt: skip
        assert [lr for lr, _ in seen] == pytest.approx(want, abs=1e-15)


def test_trainer_clips_the_gradient_norm_and_logs_the_unclipped_one(tmp_path):
    seen, rows = _train(tmp_path / "a", 2, 0.1, 0.0, grad_clip=1.0)
    for _, grad in seen:  # [3, 4] / 5
        torch.testing.assert_close(grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
    assert [r["grad_norm"] for r in rows] == pytest.approx([5.0, 5.0], abs=1e-6)
    seen, _ = _train(tmp_path / "b", 1, 0.1, 0.0, grad_clip=10.0)  # under the limit: as it is
    torch.testing.assert_close(seen[0][1], torch.tensor([3.0, 4.0]), rtol=0, atol=0)
