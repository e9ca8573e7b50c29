"""The LoRA demo (``d2nwg demo --lora``): the tiny LLaMA, its adapters, and a tiny end-to-end
run (schema and sanity, not the demo's 70% target, which needs the full run)."""

import json
import math

import pytest
import torch

from d2nwg.cli import main
from d2nwg.demo import lm as L
from d2nwg.demo.common import DemoOptions
from d2nwg.demo.lora import LoraSettings, MarkovLanguages, gap_closed, run
from d2nwg.errors import ConfigError, KeyMismatchError, ShapeError

SMALL = L.LMConfig(dim=16, layers=2, heads=2, ffn=32, max_len=12, lora_targets=("q", "k", "v", "o"))


def _random_adapters(c: L.LMConfig, m: int, seed: int) -> L.Adapter:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(m, *shape, generator=g) * 0.3 for k, shape in L.adapter_shapes(c).items()
    }


def test_zero_B_adapter_is_the_base_model():
    model = L.TinyLlama(SMALL, seed=1)
    tokens = torch.randint(SMALL.vocab, (3, 2, 10), generator=torch.Generator().manual_seed(0))
    start = L.stack_adapters([L.init_adapter(SMALL, seed=7)] * 3)
    torch.testing.assert_close(model(tokens, start), model(tokens), rtol=0, atol=0)
    # one shared A: the same seed gives the same A, B starts at zero
    a, b = L.init_adapter(SMALL, seed=7), L.init_adapter(SMALL, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if k.endswith("lora_B"))


def test_stacked_adapters_apply_per_model_and_match_a_merged_weight():
    model = L.TinyLlama(SMALL, seed=1)
    tokens = torch.randint(SMALL.vocab, (3, 2, 10), generator=torch.Generator().manual_seed(0))
    ads = _random_adapters(SMALL, 3, seed=2)
    batched = model(tokens, ads)
    for m, ad in enumerate(L.unstack_adapters(ads)):
        merged = L.TinyLlama(SMALL, seed=1)
        with torch.no_grad():  # W + (alpha / r) B A, the merged form of the adapter
            for name in L.adapter_shapes(SMALL):
                if name.endswith("lora_A"):
                    proj = name.removesuffix(".lora_A")
                    delta = ad[f"{proj}.lora_B"] @ ad[name] * SMALL.lora_scale
                    merged.get_submodule(proj).weight.add_(delta)
        torch.testing.assert_close(batched[m], merged(tokens[m : m + 1])[0], rtol=1e-4, atol=1e-5)


def test_attention_is_causal_and_the_lora_symmetry_holds():
    model = L.TinyLlama(SMALL, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(SMALL.vocab, (1, 2, 10), generator=g)
    other = tokens.clone()
    other[..., 6:] = (other[..., 6:] + 1) % SMALL.vocab
    torch.testing.assert_close(model(tokens)[..., :6, :], model(other)[..., :6, :])
    # (A, B) and (MA, BM^-1) are the same adapter: why the zoo shares one A initialization
    ads = _random_adapters(SMALL, 1, seed=3)
    M = torch.randn(SMALL.lora_rank, SMALL.lora_rank, generator=g) + 3 * torch.eye(4)
    moved = {
        k: (M @ v if k.endswith("lora_A") else v @ torch.linalg.inv(M)) for k, v in ads.items()
    }
    torch.testing.assert_close(model(tokens, moved), model(tokens, ads), rtol=1e-4, atol=1e-4)


def test_bad_adapters_and_settings_are_errors():
    model = L.TinyLlama(SMALL, seed=1)
    tokens = torch.zeros(2, 1, 5, dtype=torch.long)
    ads = _random_adapters(SMALL, 2, seed=0)
    with pytest.raises(KeyMismatchError, match="missing"):
        model(tokens, {k: v for k, v in ads.items() if "layers.1" not in k})
    with pytest.raises(ShapeError, match="lora_A"):
        model(tokens[:1], ads)
    with pytest.raises(ShapeError, match="T <= 12"):
        model(torch.zeros(1, 1, 13, dtype=torch.long))
    with pytest.raises(ConfigError):
        L.LMConfig(lora_targets=("gate",))
    with pytest.raises(ConfigError):
        LoraSettings(seq_len=100)


def test_markov_languages_sample_their_chain():
    lang = MarkovLanguages.make(vocab=8, seq_len=200, scale=0.9, seed=0)
    params = torch.tensor([[0.5, -0.5]])
    tokens = lang.sample(params, 64, torch.Generator().manual_seed(0))
    assert tokens.shape == (1, 64, 200) and int(tokens.max()) < 8
    # the empirical transition frequencies follow the task's chain
    counts = torch.zeros(8, 8)
    counts.index_put_((tokens[0, :, :-1].flatten(), tokens[0, :, 1:].flatten()),
                      torch.ones(64 * 199), accumulate=True)  # fmt: skip
    freq = counts / counts.sum(1, keepdim=True)
    torch.testing.assert_close(freq, lang.logits(params)[0].softmax(-1), atol=0.06, rtol=0)
    assert math.isnan(gap_closed(1.0, 1.0, 1.0)) and gap_closed(2.0, 1.5, 1.0) == 0.5


def test_tiny_lora_demo_end_to_end(tmp_path):
    """Every stage of ``d2nwg demo --lora`` at toy size: results.json's schema, finite losses,
    trained adapters better than the base."""
    out = tmp_path / "lora"
    results = run(DemoOptions(str(out), device="cpu", progress=False), LoraSettings.tiny())
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["loss"] == results["loss"]
    assert set(on_disk["loss"]) == {"seen", "unseen"} == set(on_disk["gap_closed"])
    for split, row in on_disk["loss"].items():
        assert {"base", "generated", "trained"} <= set(row)
        assert all(math.isfinite(v) and 0 < v < 10 for v in row.values()), (split, row)
        assert row["trained"] < row["base"], (split, row)
        assert row["true_chain"] < row["trained"], (split, row)
    assert on_disk["target"] == 0.7 and on_disk["seconds"]["total"] > 0
    assert on_disk["settings"]["lm"]["lora_rank"] == 4
    assert on_disk["zoo"]["symmetry"] == "shared A init"
    assert (out / "generator" / "config.json").exists()
    pytest.importorskip("matplotlib")
    assert (out / "lora_loss.png").stat().st_size > 1000


def test_cli_demo_lora_flag_runs_the_lora_demo(monkeypatch, tmp_path):
    import d2nwg.demo.lora

    calls = []
    monkeypatch.setattr(d2nwg.demo.lora, "run", calls.append)
    assert main(["demo", "--lora", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert calls == [DemoOptions(str(tmp_path), device="auto", seed=0, quick=True, progress=False)]
    calls.clear()
    argv = [
        "demo",
        "--lora",
        "--quick",
        "--out",
        str(tmp_path),
        "--sampler",
        "ddim",
        "--steps",
        "7",
    ]
    assert main(argv) == 0
    assert calls[0].sampling() == {"sampler": "ddim", "steps": 7}
