"""Hugging Face interoperability: zoos of PEFT adapter folders (written by ``peft``), adapters
written by d2nwg that ``PeftModel.from_pretrained`` loads (logits equal to the base plus the
LoRA update computed by hand), transformers models as generation targets (``generate_into``
and ``generate_to_directory`` + ``AutoModelForCausalLM.from_pretrained``), and the refusals.

Tiny LLaMA models built from a config here (random init, no download), all on CPU. These
tests skip only when transformers or peft is missing; ``make test`` installs both.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import d2nwg  # noqa: E402
from d2nwg.cli import main  # noqa: E402
from d2nwg.generator import D2NWG, D2NWGConfig  # noqa: E402

TINY = dict(
    vae_steps=5,
    diffusion_steps=5,
    batch_size=4,
    vae_batch=64,
    hidden_dim=32,
    depth=1,
    latent_dim=4,
    vae_hidden_dim=32,
    cond_dim=16,
    checkpoint_every=50,
    log_every=10,
    timesteps=50,
    sample_steps=4,
    prediction_type="sample",
)
PREFIX = "base_model.model."  # PEFT's key names: this, the module path, lora_A/B.weight
R, ALPHA = 2, 4


def llama_config(**change) -> transformers.LlamaConfig:
    kw = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    kw.update(change)
    return transformers.LlamaConfig(**kw)


def llama(seed: int = 0, **change) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(**change)).eval()


def write_peft_adapter(base, folder, seed: int, **lora) -> None:
    """An adapter as peft writes it, with random A and B (a trained one's stand-in)."""
    kw = dict(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    kw.update(lora)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)


def merged_by_hand(base, adapter: dict[str, torch.Tensor], scale: float):
    """The base with W += scale * B @ A for every adapted module, from the file's tensors."""
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b = adapter[key.replace("lora_A", "lora_B")]
            sd[f"{module}.weight"] += scale * (b.double() @ a.double()).float()
    model = copy.deepcopy(base)
    model.load_state_dict(sd)
    return model


def read_adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


TOKENS = torch.tensor([[1, 5, 9, 2, 30, 7, 3, 11]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def base():
    return llama(0)


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for i in range(4):
        write_peft_adapter(base, root / f"task{i}", seed=i)
        out.append(str(root / f"task{i}"))
    return out


@pytest.fixture(scope="module")
def fitted(folders):
    zoo = d2nwg.ModelZoo.from_peft(folders)
    return D2NWG(D2NWGConfig(condition="none", **TINY)).fit(zoo, progress=False)


# ---------------------------------------------------------------------------- PEFT in
def test_from_peft_reads_adapters_lazily_with_their_config(folders, tmp_path):
    zoo = d2nwg.ModelZoo.from_peft(folders)
    assert len(zoo) == 4
    config = json.load(open(os.path.join(folders[0], "adapter_config.json")))
    assert zoo.adapter_config == config and "PEFT LORA adapters" in repr(zoo)
    # PEFT's key names, in module order (layers.0 before layers.1, A before B)
    names = list(zoo.layout)
    assert names[0] == f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    assert names[-1] == f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    assert len(names) == 8
    for folder, item in zip(folders, zoo):
        expected = read_adapter(folder)
        assert set(item.state_dict) == set(expected)
        for k, v in expected.items():
            assert torch.equal(item.state_dict[k], v), k
        assert item.condition is None and item.meta == {"peft_folder": folder}
    # Lazy: a weights file changed after from_peft is what the item then holds.
    zoo.save(tmp_path / "zoo")
    again = d2nwg.ModelZoo.from_directory(tmp_path / "zoo")
    assert again.adapter_config == config and again[1:].adapter_config == config
    for x, y in zip(zoo, again):
        assert all(torch.equal(x.state_dict[k], y.state_dict[k]) for k in x.state_dict)


def test_from_peft_with_conditions_and_meta(folders, tmp_path):
    conds = torch.randn(4, 2, 3, 5)
    zoo = d2nwg.ModelZoo.from_peft(folders, conditions=conds, meta=[{"i": i} for i in range(4)])
    assert [item.meta for item in zoo] == [{"i": i} for i in range(4)]
    assert all(torch.equal(item.condition, conds[i]) for i, item in enumerate(zoo))
    zoo.save(tmp_path / "zoo")
    again = d2nwg.ModelZoo.from_directory(tmp_path / "zoo")
    assert torch.equal(again[3].condition, conds[3])
    with pytest.raises(d2nwg.ConfigError, match="3 entries for 4"):
        d2nwg.ModelZoo.from_peft(folders, conditions=list(conds[:3]))
    with pytest.raises(d2nwg.ShapeError, match=r"conditions\[2\].*task2"):
        d2nwg.ModelZoo.from_peft(
            folders, conditions=[conds[0], conds[1], torch.randn(3, 4), conds[3]]
        )


def test_plain_zoos_and_generators_have_no_adapter_config(tmp_path):
    zoo = d2nwg.ModelZoo()
    zoo.add({"w": torch.randn(3, 4)})
    zoo.save(tmp_path / "zoo")
    assert "adapter_config" not in json.load(open(tmp_path / "zoo" / "zoo.json"))
    assert d2nwg.ModelZoo.from_directory(tmp_path / "zoo").adapter_config is None
    gen = D2NWG(D2NWGConfig(condition="none", **TINY)).fit(zoo, progress=False)
    gen.save(tmp_path / "gen")
    assert "adapter_config" not in json.load(open(tmp_path / "gen" / "config.json"))
    assert D2NWG.load(tmp_path / "gen").adapter_config is None
    with pytest.raises(d2nwg.ConfigError, match="no PEFT adapter config"):
        gen.save_peft(tmp_path / "out", seed=0)


# ---------------------------------------------------------------------------- PEFT out
def test_saved_adapters_load_in_peft_with_the_hand_computed_logits(fitted, base, tmp_path):
    gen = fitted
    assert gen.adapter_config["r"] == R and gen.adapter_config["lora_alpha"] == ALPHA
    folders = gen.save_peft(tmp_path / "out", num_samples=2, seed=0)
    assert [os.path.basename(f) for f in folders] == ["sample_00000", "sample_00001"]
    sds = gen.generate(num_samples=2, seed=0)
    for folder, sd in zip(folders, sds):
        assert json.load(open(os.path.join(folder, "adapter_config.json"))) == gen.adapter_config
        written = read_adapter(folder)
        assert set(written) == set(sd) and all(torch.equal(written[k], sd[k]) for k in sd)
        by_hand = merged_by_hand(base, written, ALPHA / R)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
        # The adapter is really applied: its logits differ from the base's.
        assert not torch.allclose(logits(loaded), logits(base), atol=1e-3)
        torch.testing.assert_close(logits(loaded), logits(by_hand), rtol=1e-5, atol=1e-5)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(logits(merged), logits(by_hand), rtol=1e-5, atol=1e-5)
        for k, v in by_hand.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_the_generator_keeps_the_adapter_config_and_the_cli_writes_adapters(fitted, base, tmp_path):
    fitted.save(tmp_path / "gen")
    saved = json.load(open(tmp_path / "gen" / "config.json"))
    assert saved["format_version"] == 1 and saved["adapter_config"] == fitted.adapter_config
    loaded = D2NWG.load(tmp_path / "gen")
    assert loaded.adapter_config == fitted.adapter_config
    out = tmp_path / "adapters"
    args = ["generate", "--generator", str(tmp_path / "gen"), "--peft", "--num", "2"]
    assert main([*args, "--seed", "3", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["sample_00000", "sample_00001"]
    expected = fitted.generate(num_samples=2, seed=3)[1]
    written = read_adapter(out / "sample_00001")
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out / "sample_00001"))
    torch.testing.assert_close(
        logits(model), logits(merged_by_hand(base, written, ALPHA / R)), rtol=1e-5, atol=1e-5
    )
    assert main([*args, "--shards", "--out", str(tmp_path / "x")]) == 2  # one format at a time


def test_adapter_config_of_a_zoo_built_by_hand(base, folders, tmp_path):
    """A zoo of peft.get_peft_model_state_dict state dicts, given the config to write."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0])
    zoo = d2nwg.ModelZoo()
    for _ in range(3):
        zoo.add(peft.get_peft_model_state_dict(model))
    with pytest.raises(d2nwg.ConfigError, match="peft_type"):
        zoo.adapter_config = {"r": 2}
    zoo.adapter_config = model.peft_config["default"]  # a PeftConfig will do
    gen = D2NWG(D2NWGConfig(condition="none", **TINY)).fit(zoo, progress=False)
    (folder,) = gen.save_peft(tmp_path / "out", seed=0)
    peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)


# ---------------------------------------------------------------------------- refusals
def _copy(folder, tmp_path, name="copy") -> str:
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return str(dst)


def _edit_config(folder, **change) -> None:
    path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(path))
    config.update(change)
    json.dump(config, open(path, "w"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("base_model_name_or_path", "meta-llama/Llama-3.2-1B"),
        ("peft_type", "LOHA"),
        ("target_modules", ["q_proj", "k_proj"]),
        ("r", 4),
        ("lora_alpha", 16),
        ("use_rslora", True),
    ],
)
def test_mismatched_adapter_configs_are_refused_naming_folder_and_field(
    folders, tmp_path, field, value
):
    odd = _copy(folders[1], tmp_path)
    _edit_config(odd, **{field: value})
    with pytest.raises(d2nwg.ConfigError, match=f"{re.escape(odd)}.*{field}=") as info:
        d2nwg.ModelZoo.from_peft([folders[0], odd, folders[2]])
    assert folders[0] in str(info.value)  # the adapter it differs from


def test_what_may_differ_between_adapters(folders, tmp_path):
    other = _copy(folders[1], tmp_path)
    _edit_config(other, target_modules=["v_proj", "q_proj"], lora_dropout=0.1)
    assert len(d2nwg.ModelZoo.from_peft([folders[0], other])) == 2


def test_pickled_missing_and_corrupt_adapters_are_refused(folders, tmp_path):
    pickled = _copy(folders[1], tmp_path, "pickled")
    os.remove(os.path.join(pickled, "adapter_model.safetensors"))
    with open(os.path.join(pickled, "adapter_model.bin"), "wb") as f:
        f.write(b"\x80\x04not unpickled")
    with pytest.raises(
        d2nwg.FileFormatError, match=re.escape(f"{pickled}: holds adapter_model.bin, a pickle")
    ):
        d2nwg.ModelZoo.from_peft([folders[0], pickled])

    missing = str(tmp_path / "nowhere")
    with pytest.raises(
        d2nwg.FileFormatError, match=re.escape(f"{missing}: no such PEFT adapter folder")
    ):
        d2nwg.ModelZoo.from_peft([folders[0], missing])
    no_weights = _copy(folders[1], tmp_path, "no_weights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    with pytest.raises(
        d2nwg.FileFormatError, match=re.escape(f"{no_weights}: no adapter_model.safetensors")
    ):
        d2nwg.ModelZoo.from_peft([folders[0], no_weights])

    bad_json = _copy(folders[1], tmp_path, "bad_json")
    with open(os.path.join(bad_json, "adapter_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(d2nwg.FileFormatError, match=re.escape(f"{bad_json}/adapter_config.json")):
        d2nwg.ModelZoo.from_peft([folders[0], bad_json])
    not_peft = _copy(folders[1], tmp_path, "not_peft")
    with open(os.path.join(not_peft, "adapter_config.json"), "w") as f:
        json.dump({"r": 2}, f)
    with pytest.raises(d2nwg.FileFormatError, match="no 'peft_type'"):
        d2nwg.ModelZoo.from_peft([folders[0], not_peft])

    # A corrupt weights file: the first fixes the layout (read now), later ones when accessed.
    corrupt = _copy(folders[1], tmp_path, "corrupt")
    weights = os.path.join(corrupt, "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    zoo = d2nwg.ModelZoo.from_peft([folders[0], corrupt])
    zoo[0]
    with pytest.raises(d2nwg.FileFormatError, match=re.escape(weights)):
        zoo[1]
    with pytest.raises(d2nwg.FileFormatError, match=re.escape(weights)):
        d2nwg.ModelZoo.from_peft([corrupt, folders[0]])
    with pytest.raises(d2nwg.ConfigError, match="a list of adapter folders"):
        d2nwg.ModelZoo.from_peft(folders[0])
    with pytest.raises(d2nwg.ConfigError, match="at least one"):
        d2nwg.ModelZoo.from_peft([])


# ---------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def llama_gen():
    """A generator of the tiny LLaMA's weights (tied embeddings): untrained, which is all
    writing into targets needs."""
    zoo = d2nwg.ModelZoo()
    for seed in range(2):
        zoo.add(llama(seed).state_dict())
    assert "lm_head.weight" in zoo.layout  # kept as a tie of model.embed_tokens.weight
    cfg = D2NWGConfig(condition="none", **TINY)
    return D2NWG.untrained(zoo[0].state_dict, cfg)


def test_generate_into_a_pretrained_model_keeps_its_tied_weights(llama_gen):
    model = llama(5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = llama_gen.generate(seed=0)[0]
    assert llama_gen.generate_into(model, seed=0) is model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    got = model.state_dict()
    assert set(expected) == set(got)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("target", ["model", "config"])
def test_shards_with_config_json_load_with_from_pretrained(llama_gen, tmp_path, target):
    model = llama(5)
    out = tmp_path / "model"
    index = llama_gen.generate_to_directory(
        out, seed=0, shard_size=2048, model_config=model if target == "model" else model.config
    )
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == "llama"
    assert config.get("architectures") == (["LlamaForCausalLM"] if target == "model" else None)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    expected = llama_gen.generate(seed=0)[0]
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5)


def test_a_zoo_of_checkpoints_without_the_tied_copy(tmp_path):
    """A zoo read from Hugging Face checkpoints, which store a tied tensor once (no
    lm_head.weight): the model's tie fills it, in place and through from_pretrained."""
    template = {k: v for k, v in llama(0).state_dict().items() if k != "lm_head.weight"}
    gen = D2NWG.untrained(template, D2NWGConfig(condition="none", **TINY))
    model = gen.generate_into(llama(5), seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gen.generate_to_directory(tmp_path, seed=1, model_config=model.config)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"], info
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(logits(loaded), logits(model))


def test_shards_for_another_architecture_are_refused_before_writing(llama_gen, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(d2nwg.ShapeError, match="model.embed_tokens.weight"):
        llama_gen.generate_to_directory(out, seed=0, model_config=llama_config(hidden_size=32))
    with pytest.raises(d2nwg.KeyMismatchError, match="lacks"):
        llama_gen.generate_to_directory(out, seed=0, model_config=llama_config(num_hidden_layers=1))
    assert not out.exists() or os.listdir(out) == []
    with pytest.raises(d2nwg.ConfigError, match="PretrainedConfig or PreTrainedModel"):
        llama_gen.generate_to_directory(out, seed=0, model_config={"model_type": "llama"})
    # A model with more tensors than the generator writes: a warning names them.
    with pytest.warns(RuntimeWarning, match="outside the generator's layout"):
        llama_gen.generate_to_directory(
            out, seed=0, model_config=llama_config(tie_word_embeddings=False)
        )


def test_info_names_the_hf_extra(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("hugging face:"))
    assert f"transformers {transformers.__version__}" in line
    assert f"peft {peft.__version__}" in line
