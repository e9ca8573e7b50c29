"""The LoRA demo (``d2nwg demo --lora``): the transformers LLaMA, batched LoRA against PEFT's
own forward, PEFT adapter folders in and out, and a tiny end-to-end run (schema, files and
sanity; not the demo's target, which needs the full run).

Tiny models built from a config here (random init, no download), all on CPU. These tests skip
only when transformers or peft is missing; ``make test`` installs both.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from d2nwg.cli import main  # noqa: E402
from d2nwg.demo import llama as L  # noqa: E402
from d2nwg.demo.common import DemoOptions  # noqa: E402
from d2nwg.demo.lora import (  # noqa: E402
    LoraSettings,
    MarkovLanguages,
    gap_closed,
    run,
    transition_frequencies,
)
from d2nwg.errors import ConfigError, KeyMismatchError, ShapeError  # noqa: E402
from d2nwg.zoo import ModelZoo  # noqa: E402

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SMALL = L.LMConfig(dim=16, layers=2, heads=2, ffn=32, max_len=12, lora_targets=ALL_PROJECTIONS)


def _base(c: L.LMConfig = SMALL):
    return L.build_base(c, seed=1).eval().requires_grad_(False)


def _random_adapters(model, c: L.LMConfig, m: int, seed: int) -> L.Adapter:
    g = torch.Generator().manual_seed(seed)
    shapes = L.adapter_shapes(model, c)
    return {k: torch.randn(m, *shape, generator=g) * 0.3 for k, shape in shapes.items()}


def _tokens(m: int, n: int, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(SMALL.vocab, (m, n, t), generator=torch.Generator().manual_seed(seed))


def test_adapters_carry_peft_key_names_and_zero_B_is_the_base():
    model = _base()
    shapes = L.adapter_shapes(model, SMALL)
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in shapes
    assert len(shapes) == 2 * SMALL.layers * len(ALL_PROJECTIONS)
    tokens = _tokens(3, 2)
    start = L.stack_adapters([L.init_adapter(shapes, seed=7)] * 3)
    plain = L.logits(model, SMALL, tokens)
    torch.testing.assert_close(L.logits(model, SMALL, tokens, start), plain)
    # one shared A: the same seed gives the same A, B starts at zero
    a, b = L.init_adapter(shapes, seed=7), L.init_adapter(shapes, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if k.endswith("lora_B.weight"))
    assert all(v.any() for k, v in a.items() if k.endswith("lora_A.weight"))


def test_batched_lora_equals_peft_forward_per_adapter():
    """Sequence n of model m through the batched hooks = PEFT's own LoRA forward of adapter m."""
    model = _base()
    tokens = _tokens(3, 2)
    ads = _random_adapters(model, SMALL, 3, seed=2)
    batched = L.logits(model, SMALL, tokens, ads)
    peft_model = peft.get_peft_model(_base(), SMALL.lora_config())
    for m, ad in enumerate(L.unstack_adapters(ads)):
        assert not peft.set_peft_model_state_dict(peft_model, ad).unexpected_keys
        with torch.no_grad():
            reference = peft_model(input_ids=tokens[m], use_cache=False).logits
        torch.testing.assert_close(batched[m], reference, rtol=1e-4, atol=1e-5)
    # the hooks are gone after the call: the model is the base again
    torch.testing.assert_close(model(input_ids=tokens[0]).logits, L.logits(model, SMALL, tokens)[0])


def test_the_lora_symmetry_holds():
    # (A, B) and (MA, BM^-1) are the same adapter: why the zoo shares one A initialization
    model = _base()
    tokens = _tokens(1, 2)
    ads = _random_adapters(model, SMALL, 1, seed=3)
    M = torch.randn(SMALL.lora_rank, SMALL.lora_rank, generator=torch.Generator().manual_seed(0))
    M = M + 3 * torch.eye(SMALL.lora_rank)
    moved = {
        k: (M @ v if k.endswith("lora_A.weight") else v @ torch.linalg.inv(M))
        for k, v in ads.items()
    }
    expected = L.logits(model, SMALL, tokens, ads)
    moved_logits = L.logits(model, SMALL, tokens, moved)
    torch.testing.assert_close(moved_logits, expected, rtol=1e-4, atol=1e-4)


def test_adapters_written_by_peft_make_a_zoo_and_score_through_peft(tmp_path):
    model = _base()
    ads = _random_adapters(model, SMALL, 2, seed=4)
    folders = [str(tmp_path / f"a{i}") for i in range(2)]
    L.save_peft_adapters(model, SMALL, L.unstack_adapters(ads), folders)
    zoo = ModelZoo.from_peft(folders)
    assert zoo.adapter_config["r"] == SMALL.lora_rank
    for i, item in enumerate(zoo):
        assert item.state_dict.keys() == ads.keys()
        assert all(torch.equal(item.state_dict[k], ads[k][i]) for k in ads)
    tokens = _tokens(2, 3)
    through_peft = L.peft_losses(model, folders, tokens[:, :, :])  # [F, N]
    torch.testing.assert_close(through_peft.mean(1), L.lm_loss(model, SMALL, tokens, ads))
    # peft_losses leaves the base as it was (its LoRA layers unloaded)
    assert not any("lora" in name for name, _ in model.named_modules())


def test_finetuning_many_adapters_at_once_lowers_each_loss():
    model = _base()
    shapes = L.adapter_shapes(model, SMALL)
    start = L.stack_adapters([L.init_adapter(shapes, seed=0)] * 2)
    data = _tokens(2, 4, seed=5)  # each adapter fits its own four sequences
    trained = L.finetune_adapters(model, SMALL, start, lambda step, g: data, steps=20, lr=5e-2)
    before, after = L.lm_loss(model, SMALL, data, start), L.lm_loss(model, SMALL, data, trained)
    assert (after < before - 0.1).all(), (before, after)
    # A moves 16x slower than B (LoRA+): it stays near the shared start
    for k, v in trained.items():
        if k.endswith("lora_A.weight"):
            assert (v - start[k]).abs().max() < start[k].abs().max()


def test_bad_adapters_tokens_and_settings_are_errors():
    model = _base()
    tokens = torch.zeros(2, 1, 5, dtype=torch.long)
    ads = _random_adapters(model, SMALL, 2, seed=0)
    with pytest.raises(KeyMismatchError, match="missing"):
        L.logits(model, SMALL, tokens, {k: v for k, v in ads.items() if "layers.1" not in k})
    with pytest.raises(ShapeError, match="lora_A"):
        L.logits(model, SMALL, tokens[:1], ads)
    with pytest.raises(ShapeError, match="T <= 12"):
        L.logits(model, SMALL, torch.zeros(1, 1, 13, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\[2, N, T\]"):
        L.peft_losses(model, ["a", "b"], tokens[:1])
    with pytest.raises(ConfigError, match="lora_targets"):
        L.LMConfig(lora_targets=("gate_proj",))
    with pytest.raises(ConfigError, match="heads"):
        L.LMConfig(dim=30, heads=4)
    with pytest.raises(ConfigError, match="seq_len"):
        LoraSettings(seq_len=100)
    with pytest.raises(ConfigError, match="condition"):
        LoraSettings(condition="bigrams")


def test_transition_frequencies_count_each_sequences_steps():
    tokens = torch.tensor([[[0, 1, 1, 2], [2, 2, 2, 2]]])  # [P=1, N=2, T=4], vocab 3
    freq = transition_frequencies(tokens, vocab=3)
    assert freq.shape == (1, 2, 9)
    expected = torch.zeros(2, 9)
    expected[0, [0 * 3 + 1, 1 * 3 + 1, 1 * 3 + 2]] = 1 / 3  # 0->1, 1->1, 1->2
    expected[1, 2 * 3 + 2] = 1.0  # 2->2 three times
    torch.testing.assert_close(freq[0], expected)


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
    trained adapters better than the base; out/base and out/adapters/<task> load with
    transformers and PEFT, and the zoo's folders with ModelZoo.from_peft."""
    out = tmp_path / "lora"
    settings = LoraSettings.tiny()
    results = run(DemoOptions(str(out), device="cpu", progress=False), settings)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["loss"] == results["loss"]
    assert set(on_disk["loss"]) == {"seen", "unseen"} == set(on_disk["gap_closed"])
    for split, row in on_disk["loss"].items():
        assert {"base", "generated", "trained"} <= set(row)
        assert all(math.isfinite(v) and 0 < v < 10 for v in row.values()), (split, row)
        assert row["trained"] < row["base"], (split, row)
        assert row["true_chain"] < row["trained"], (split, row)
    assert on_disk["target"] == 0.8 and on_disk["seconds"]["total"] > 0
    assert on_disk["settings"]["lm"]["lora_targets"] == ["q_proj", "v_proj"]
    assert on_disk["zoo"]["symmetry"] == "shared A init"
    assert on_disk["peft_vs_batched"] < 1e-4
    assert (out / "generator" / "config.json").exists()

    # what a user takes away: the base and one PEFT adapter per unseen task
    base = transformers.LlamaForCausalLM.from_pretrained(out / "base").eval()
    adapters = on_disk["files"]["adapters"]
    assert sorted(adapters) == sorted(os.listdir(out / "adapters"))
    assert len(adapters) == settings.unseen
    tokens = torch.randint(settings.lm.vocab, (2, settings.seq_len))
    with torch.no_grad():
        plain = base(input_ids=tokens).logits
        for entry in adapters.values():
            model = peft.PeftModel.from_pretrained(base, out / entry["folder"]).eval()
            assert not torch.allclose(model(input_ids=tokens).logits, plain)
            base = model.unload()
    # the zoo on disk: PEFT folders of the pretrained base
    folders = sorted(str(p) for p in (out / "zoo").iterdir())
    zoo = ModelZoo.from_peft(folders)
    assert len(zoo) == on_disk["zoo"]["adapters"] == settings.seen_grid**2 * settings.seeds
    assert zoo.adapter_config["base_model_name_or_path"] == str(out / "base")
    pytest.importorskip("matplotlib")
    assert (out / "lora_loss.png").stat().st_size > 1000


def test_cli_demo_lora_flag_runs_the_lora_demo(monkeypatch, tmp_path):
    import d2nwg.demo.lora

    calls = []
    monkeypatch.setattr(d2nwg.demo.lora, "run", calls.append)
    assert main(["demo", "--lora", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert calls == [DemoOptions(str(tmp_path), device="auto", seed=0, quick=True, progress=False)]
    calls.clear()
    argv = ["demo", "--lora", "--quick", "--out", str(tmp_path), "--sampler", "ddim"]
    assert main([*argv, "--steps", "7"]) == 0
    assert calls[0].sampling() == {"sampler": "ddim", "steps": 7}
