"""Text conditions: the hashed n-gram featurizer, a text generator learning which words (in
which order) mean which weights, precomputed embeddings of any encoder, old text generators,
and ``d2nwg demo --condition text``."""

from __future__ import annotations

import json

import pytest
import torch

import d2nwg
from d2nwg.cli import main
from d2nwg.demo.common import DemoOptions
from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.text import hashed_ngrams

TINY = dict(
    vae_steps=150,
    diffusion_steps=200,
    batch_size=16,
    vae_batch=128,
    hidden_dim=64,
    depth=2,
    latent_dim=8,
    vae_hidden_dim=64,
    cond_dim=32,
    checkpoint_every=1000,
    log_every=50,
    timesteps=100,
    sample_steps=10,
    vae_lr=3e-3,
    lr=3e-3,
    prediction_type="sample",
)
DIM = 32


def test_hashed_ngrams_is_deterministic_and_tells_words_apart():
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    x = hashed_ngrams(words)
    assert x.shape == (10, 256) and x.dtype == torch.float32
    torch.testing.assert_close(x.norm(dim=1), torch.ones(10))
    assert torch.equal(x, hashed_ngrams(" ".join(words)))  # a string is split on whitespace
    assert torch.equal(hashed_ngrams(["one"]), x[1:2])  # a word's row depends on it alone
    sim = x @ x.T - torch.eye(10)
    assert float(sim.abs().max()) < 0.5  # distinct words: far from parallel
    # pinned values: blake2b is the same on every machine and process (Python's hash is not)
    # (the 12 n-grams of "<zero>" into 16 buckets, +-1 each, some cancelling)
    v = hashed_ngrams(["zero"], dim=16)[0]
    counts = (v / v.abs()[v != 0].min()).round().int().tolist()
    assert counts == [0, 0, -1, 1, 1, 0, 1, -1, 0, 0, 1, 1, 0, 0, -1, 2]
    assert not torch.equal(hashed_ngrams(["zero"], seed=1), hashed_ngrams(["zero"]))
    for bad in ([], [""], "", ["ok", 3]):
        with pytest.raises(d2nwg.ConfigError):
            hashed_ngrams(bad)


def _text_zoo(n: int = 16) -> tuple[d2nwg.ModelZoo, dict[str, dict[str, torch.Tensor]]]:
    """Two tasks with the same two words in opposite orders, each with its own target."""
    g = torch.Generator().manual_seed(0)
    targets = {
        phrase: {
            "fc.weight": torch.randn(4, 16, generator=g),
            "fc.bias": torch.randn(4, generator=g),
        }
        for phrase in ("alpha beta", "beta alpha")
    }
    zoo = d2nwg.ModelZoo()
    for i in range(n):
        phrase = list(targets)[i % 2]
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in targets[phrase].items()}
        zoo.add(sd, condition=hashed_ngrams(phrase, dim=DIM), meta={"phrase": phrase})
    return zoo, targets


def _distance(sd: dict, target: dict) -> float:
    return float(sum((sd[k] - v).square().sum() for k, v in target.items()))


@pytest.fixture(scope="module")
def text_gen() -> tuple[D2NWG, dict]:
    zoo, targets = _text_zoo()
    gen = D2NWG(D2NWGConfig(condition="text", **TINY)).fit(zoo, progress=False)
    return gen, targets


def test_text_generator_follows_the_words_in_order(text_gen):
    """The two conditions hold the same words; only their order tells the targets apart."""
    gen, targets = text_gen
    assert gen.max_classes == 2  # one condition slot per word
    for phrase, target in targets.items():
        other = targets[next(p for p in targets if p != phrase)]
        sds = gen.generate(hashed_ngrams(phrase, dim=DIM), num_samples=4, seed=0)
        right = sum(_distance(sd, target) for sd in sds) / 4
        wrong = sum(_distance(sd, other) for sd in sds) / 4
        # the targets lie ~2 * 68 = 136 apart; the zoo's spread is 0.05^2 * 68 = 0.17
        assert right < 0.1 * wrong, (phrase, right, wrong)


def test_text_generator_takes_any_precomputed_embedding(text_gen, tmp_path):
    """[L, E] tensors of any encoder (here: random) with E = the zoo's width, one or a list."""
    gen, _ = text_gen
    assert len(gen.generate(torch.randn(2, DIM), num_samples=2)) == 2
    assert len(gen.generate(torch.randn(3, 2, DIM), num_samples=1)) == 3
    assert len(gen.generate([torch.randn(1, DIM), torch.randn(2, DIM).double()])) == 2
    with pytest.raises(d2nwg.ShapeError, match="F = 32"):
        gen.generate(torch.randn(2, DIM + 1))
    with pytest.raises(d2nwg.ShapeError, match="max_cond_slots"):
        gen.generate(torch.randn(3, DIM))  # longer than any zoo condition: no slot for word 3
    gen.save(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "config.json").read_text())["max_classes"] == 2
    loaded = D2NWG.load(tmp_path / "gen")
    cond = hashed_ngrams("beta alpha", dim=DIM)
    a, b = gen.generate(cond, seed=3)[0], loaded.generate(cond, seed=3)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_generators_saved_without_slots_still_load(tmp_path):
    """A text generator from before slots (max_classes 0 in its config.json) builds and loads
    as it was: no slot embedding, the same samples."""
    template = {"fc.weight": torch.zeros(4, 16), "fc.bias": torch.zeros(4)}
    cfg = D2NWGConfig(condition="text", **{**TINY, "sample_steps": 4})
    old = D2NWG.untrained(template, cfg, cond_features=DIM)
    assert old.max_classes == 0 and old.model.denoiser.slot_embed is None
    old.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    assert meta["max_classes"] == 0 and meta["cond_rank"] == 2
    loaded = D2NWG.load(tmp_path / "old")
    assert loaded.model.denoiser.slot_embed is None
    cond = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0))
    a, b = old.generate(cond, seed=1)[0], loaded.generate(cond, seed=1)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_condition_flag_reaches_the_digits_demo(monkeypatch, tmp_path):
    import d2nwg.demo

    calls = []
    monkeypatch.setattr(d2nwg.demo, "run", calls.append)
    assert (
        main(["demo", "--condition", "text", "--quick", "--no-progress", "--out", str(tmp_path)])
        == 0
    )
    assert calls == [
        DemoOptions(str(tmp_path), seed=0, quick=True, progress=False, condition="text")
    ]
    calls.clear()
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert calls[0].condition == "dataset"
    assert main(["demo", "--lora", "--condition", "text", "--out", str(tmp_path)]) != 0


def test_tiny_text_demo(tmp_path):
    """The digits demo with text conditions, tiny: seen and unseen splits, no rotated copies."""
    from d2nwg.demo import DemoSettings, run

    s = DemoSettings(
        seen=12, unseen=3, novel=2, seeds=1, symmetries=2, head_steps=30, candidates=2,
        finetune_steps=3, finetune_tasks=2, vae_steps=10, diffusion_steps=10,
    )  # fmt: skip
    o = DemoOptions(str(tmp_path), device="cpu", progress=False, condition="text")
    results = run(o, s)
    assert results["condition"] == "text"
    assert set(results["accuracy"]) == set(results["tasks"]) == {"seen", "unseen"}
    assert results["zoo"]["models"] == 12  # symmetries forced to 0 for text
    assert results["generator"]["config"]["condition"] == "text"
    assert "nine" in results["text"]["no_novel_split"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["condition"] == "text"
    assert D2NWG.load(tmp_path / "generator").max_classes == 5
