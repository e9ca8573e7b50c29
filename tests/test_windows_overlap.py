"""Overlapping windows: the sliding layout, the per-token average of the windows' predictions,
the denoiser over whole latent sequences (one window of it all is the whole sequence), and
the windows training draws."""

from __future__ import annotations

import json

import pytest
import torch

import d2nwg
from d2nwg.errors import ConfigError
from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.generator.stages import draw_windows
from d2nwg.generator.synthesis import WindowedDenoiser
from d2nwg.windows import WindowLayout, slide_windows

# Layers of 15, 2, 2, 8 and 1 tokens of 64 values (28 tokens).
SHAPES = {
    "fc1.weight": (24, 40),
    "fc1.bias": (96,),
    "norm.weight": (96,),
    "fc2.weight": (5, 96),
    "fc2.bias": (5,),
}
TINY = dict(
    condition="none", chunk_size=64, vae_steps=20, diffusion_steps=20, batch_size=8,
    vae_batch=64, hidden_dim=32, depth=1, latent_dim=8, vae_hidden_dim=32, timesteps=100,
    sample_steps=5, checkpoint_every=1000, log_every=50,
)  # fmt: skip


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def random_tokenizer(g: torch.Generator) -> d2nwg.WeightTokenizer:
    C = int(torch.randint(1, 9, (1,), generator=g))
    sd = {
        f"l{i}.weight": torch.zeros(int(torch.randint(0, 40, (1,), generator=g)))
        for i in range(int(torch.randint(1, 8, (1,), generator=g)))
    }
    sd["last"] = torch.zeros(3)  # at least one non-empty layer
    return d2nwg.WeightTokenizer.from_state_dict(sd, chunk_size=C)


def test_slide_windows_by_hand():
    assert slide_windows(28, 6, 3) == [(a, a + 6) for a in range(0, 22, 3)] + [(22, 28)]
    assert slide_windows(10, 4, 4) == [(0, 4), (4, 8), (6, 10)]  # the last ends at T
    assert slide_windows(6, 2, 1) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
    assert slide_windows(5, 6, 3) == [(0, 5)]  # fits one window


@pytest.mark.parametrize("seed", range(20))
def test_overlapping_windows_cover_every_token_and_average_it(seed):
    g = torch.Generator().manual_seed(seed)
    tok = random_tokenizer(g)
    T = tok.num_tokens
    W = int(torch.randint(2, 9, (1,), generator=g))
    stride = int(torch.randint(1, W, (1,), generator=g))
    win = WindowLayout.from_tokenizer(tok, W, stride)
    if T <= W:
        assert win.num_windows == 1 and win.spans == ((0, T),)
        return
    assert win.overlapping and not win.padded and win.spans == tuple(slide_windows(T, W, stride))
    assert torch.equal(win.positions, tok.positions[win.index])
    assert torch.equal(win.kinds, tok.kinds[win.index])
    # each token's cover slots hold that token, and its weights sum to 1
    flat_index = torch.cat([win.index.flatten(), torch.tensor([-1])])
    real = win.cover_weight > 0
    tokens = torch.arange(T)[:, None].expand_as(win.cover)
    assert torch.equal(flat_index[win.cover][real], tokens[real])
    torch.testing.assert_close(win.cover_weight.sum(1), torch.ones(T))
    # blend: each token the mean of the values its windows gave it (here: the window's index)
    pred = torch.arange(win.num_windows, dtype=torch.float64)[None, :, None, None]
    pred = pred.expand(2, -1, W, 3)
    want = torch.tensor(
        [
            sum(w for w, (a, b) in enumerate(win.spans) if a <= t < b)
            / sum(1 for a, b in win.spans if a <= t < b)
            for t in range(T)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(win.blend(pred), want[None, :, None].expand(2, T, 3))
    x = torch.randn(2, T, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(win.blend(win.gather(x)), x)  # copies average to themselves
    # training sees every offset
    train = win.for_training()
    assert train.spans == tuple((a, a + W) for a in range(T - W + 1))


def test_aligned_windows_blend_exactly():
    tok = d2nwg.WeightTokenizer.from_state_dict(weights(), chunk_size=64)
    win = WindowLayout.from_tokenizer(tok, 6, stride=6)  # stride >= W: aligned, padded
    assert not win.overlapping and win.padded and win.for_training() is win
    x = torch.randn(3, tok.num_tokens, 4)
    assert torch.equal(win.blend(win.gather(x)), x)
    assert win.noise_blocks() == list(win.spans)
    with pytest.raises(ConfigError, match="stride"):
        WindowLayout.from_tokenizer(tok, 6, stride=-1)


def test_token_batches_cut_the_same_way_whatever_the_range():
    tok = d2nwg.WeightTokenizer.from_state_dict(weights(), chunk_size=64)
    win = WindowLayout.from_tokenizer(tok, 6, 3)
    assert win.token_batches(0, 28, 2) == [(0, 12), (12, 24), (24, 28)]
    assert win.token_batches(5, 20, 2) == [(5, 12), (12, 20)]
    aligned = WindowLayout.from_tokenizer(tok, 6, 6)  # whole windows of the aligned layout
    assert aligned.token_batches(0, 28, 3) == [(0, 15), (15, 27), (27, 28)]


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_one_window_of_the_whole_sequence_is_the_denoiser_itself(batch):
    """A window that holds the whole sequence (W >= T), overlapping or not, is the denoiser on
    the whole sequence, bit for bit, however the rows are batched."""
    gen = D2NWG.untrained(weights(), D2NWGConfig(**TINY))
    den, tok = gen.model.denoiser.eval(), gen.tokenizer
    T, d = tok.num_tokens, gen.config.latent_dim
    x, t = torch.randn(4, T, d), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        whole = torch.cat(
            [
                den(x[i : i + 1], t[i : i + 1], positions=tok.positions, layer_kinds=tok.kinds)
                for i in range(4)
            ]
        )
        for window, stride in ((T, 1), (2 * T, 3), (0, 0)):
            win = WindowLayout.from_tokenizer(tok, window, stride)
            out = WindowedDenoiser(den, win, batch, torch.device("cpu"))(x, t, None)
            torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
            if batch == 1:  # the same denoiser calls, row by row
                assert torch.equal(out, whole)


def test_a_window_over_the_whole_sequence_generates_what_no_windows_do():
    """window >= T with a stride trains and samples exactly as the model-level generator."""
    g = torch.Generator().manual_seed(1)
    zoo = d2nwg.ModelZoo()
    for _ in range(8):
        zoo.add({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights().items()})
    whole = D2NWG(D2NWGConfig(**TINY)).fit(zoo, progress=False)
    windowed = D2NWG(D2NWGConfig(**TINY, window=40, window_stride=1)).fit(zoo, progress=False)
    assert windowed.windows.num_windows == 1 and windowed.config.window_stride == 1
    a = whole.generate_tokens(num_samples=3, seed=4)
    b = windowed.generate_tokens(num_samples=3, seed=4)
    assert torch.equal(a, b)


class ElementwiseDenoiser:
    """A stand-in denoiser whose output at a slot depends only on that slot (no BLAS), so
    any batching of windows must give the same bits; its output also depends on where the
    window sits (positions), so windows sharing a token predict different values there."""

    def __call__(self, x, t, cond, *, positions, layer_kinds, mask=None):
        return torch.sin(x * 3 + positions[..., 1:2] * 0.7 + t[:, None, None] * 0.01)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_windows_are_averaged_the_same_whatever_the_batches(stride):
    tok = d2nwg.WeightTokenizer.from_state_dict(weights(), chunk_size=64)
    win = WindowLayout.from_tokenizer(tok, 4, stride)
    den, cpu = ElementwiseDenoiser(), torch.device("cpu")
    x = torch.randn(3, tok.num_tokens, 5, generator=torch.Generator().manual_seed(stride))
    t = torch.tensor([3, 40, 99])
    windows = win.gather(x)  # [3, NW, W, d]
    pred = den(
        windows.flatten(0, 1),
        t.repeat_interleave(win.num_windows),
        None,
        positions=win.positions.repeat(3, 1, 1),
        layer_kinds=None,
    )
    want = win.blend(pred.view_as(windows))
    for batch in (1, 5, 3 * win.num_windows):
        assert torch.equal(WindowedDenoiser(den, win, batch, cpu)(x, t, None), want), batch


def test_generators_saved_before_window_stride_load_with_aligned_windows(tmp_path):
    """A config.json without window_stride (written before it existed) was trained on aligned
    windows: it loads with them; a saved config keeps its resolved stride."""
    gen = D2NWG.untrained(weights(), D2NWGConfig(**TINY, window=6))
    assert gen.config.window_stride == 3 and gen.windows.overlapping
    gen.save(tmp_path)
    assert D2NWG.load(tmp_path).windows.spans == gen.windows.spans
    path = tmp_path / "config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["window_stride"]
    path.write_text(json.dumps(meta))
    old = D2NWG.load(tmp_path)
    assert not old.windows.overlapping
    assert old.windows.spans == WindowLayout.from_tokenizer(gen.tokenizer, 6, 6).spans


def test_a_models_windows_share_one_encoding_of_its_condition():
    """Windowed training encodes each drawn model's condition once and indexes it for each of
    its windows (``cond_index``): the loss equals encoding every (model, window) row alone."""
    from d2nwg.generator.conditions import RawConditions

    g = torch.Generator().manual_seed(3)
    cfg = D2NWGConfig(**{**TINY, "condition": "dataset"}, window=4)
    gen = D2NWG.untrained(weights(), cfg, cond_features=6, max_classes=3)
    conds = [torch.randn(3, int(torch.randint(2, 5, (1,), generator=g)), 6, generator=g)
             for _ in range(5)]  # fmt: skip
    raw = RawConditions.stack(conds, 3, 6)
    idx = torch.tensor([4, 1, 4, 0, 1, 4])  # models of six (model, window) rows
    models, cond_index = torch.unique(idx, return_inverse=True)
    W, d = gen.windows.size, gen.config.latent_dim
    x0, noise = torch.randn(6, W, d, generator=g), torch.randn(6, W, d, generator=g)
    t = torch.randint(cfg.timesteps, (6,), generator=g)
    schedule = gen.config.noise_schedule()

    def loss(raw_rows, **index):
        drop = torch.Generator().manual_seed(0)  # the same dropout coins for both
        return gen.model(x0, t, noise, raw_rows, schedule, 0.5, drop, **index)

    torch.testing.assert_close(loss(raw[models], cond_index=cond_index), loss(raw[idx]))


def _tokenizer() -> d2nwg.WeightTokenizer:
    return d2nwg.WeightTokenizer.from_state_dict(weights(), chunk_size=64)


def test_training_draws_cover_the_ends_as_often_as_the_middle():
    """Windows at every offset, drawn as training draws them: the first and last tokens lie
    in as many drawn windows as a middle token (uniform offsets would give them a W-th), and
    none in more than twice as many."""
    win = WindowLayout.from_tokenizer(_tokenizer(), 6, 3).for_training()
    w = draw_windows(win, 200_000, torch.Generator().manual_seed(0))
    assert int(w.min()) == 0 and int(w.max()) == win.num_windows - 1
    covered = torch.zeros(28)
    covered.index_add_(0, win.index[w].flatten(), torch.ones(w.numel() * 6))
    share = covered / w.numel()
    # every token: W to 2W - 1 of the T + W - 1 starts (6 / 33 to 11 / 33)
    assert float(share.min()) >= 6 / 33 - 0.005 and float(share.max()) <= 11 / 33 + 0.005, share
    assert float(share[5]) == pytest.approx(11 / 33, abs=0.005)
    assert float(share[0]) == pytest.approx(float(share[14]), abs=0.01)
    assert float(share[-1]) == pytest.approx(float(share[14]), abs=0.01)
    aligned = WindowLayout.from_tokenizer(_tokenizer(), 6, 0)
    counts = torch.bincount(draw_windows(aligned, 7000, torch.Generator().manual_seed(0)))
    assert counts.numel() == aligned.num_windows and int(counts.min()) > 700
