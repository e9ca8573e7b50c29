"""The digits demo's model families (head / mlp / cnn), its memorization baselines and the
whole-network demo at toy size."""

from __future__ import annotations

import json

import pytest
import torch

import d2nwg.demo
from d2nwg.cli import main
from d2nwg.demo import baselines as B
from d2nwg.demo import families as Fm
from d2nwg.demo.common import DemoOptions
from d2nwg.demo.digits import WAYS, load_digits, make_tasks
from d2nwg.errors import ConfigError


@pytest.fixture(scope="module")
def data():
    return load_digits(0, pretrain_steps=20)


@pytest.fixture(scope="module")
def families(data):
    """Each family once (a network's body: a short pretraining, enough for these tests)."""
    return {name: Fm.family(name, data, pretrain_steps=30) for name in Fm.MODELS}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_batched_logits_are_the_modules(data, families, name):
    """The vmapped forward of stacked parameters is each model's own nn.Module forward, and a
    model's state dict (the family's names) loads into that module."""
    fam = families[name]
    params = fam.init(3, torch.Generator().manual_seed(0))
    x = data.pixels["test"][:7]
    batched = fam.logits(params, x.expand(3, -1, -1))
    for m, sd in enumerate(Fm.unstack(params)):
        net = fam.module()
        net.load_state_dict(sd)
        torch.testing.assert_close(batched[m], net(x), rtol=1e-5, atol=1e-5)
    # the pretrained body is every model's start; only the heads differ
    for k, v in fam.body.items():
        assert torch.equal(params[k][1], v)
    assert not torch.equal(params[fam.head[0]][0], params[fam.head[0]][1])


@pytest.mark.parametrize("name", ["head", "mlp", "cnn"])
def test_permute_classes_permutes_the_logits(data, families, name):
    fam = families[name]
    params = fam.init(2, torch.Generator().manual_seed(1))
    perm = torch.stack([torch.randperm(WAYS, generator=torch.Generator().manual_seed(s))
                        for s in range(2)])  # fmt: skip
    x = (data.features if fam.inputs == "features" else data.pixels)["val"][:5]
    x = x.expand(2, -1, -1)
    before, after = fam.logits(params, x), fam.logits(fam.permute_classes(params, perm), x)
    for m in range(2):
        torch.testing.assert_close(after[m], before[m][:, perm[m]])


def test_training_moves_the_body_and_learns(data, families):
    """Zoo models fine-tune every layer: the hidden layer moves well beyond 10% and the
    models beat a random head on the pretrained body."""
    fam = families["mlp"]
    tasks = make_tasks(4, 0, 0).seen
    g = torch.Generator().manual_seed(0)
    start = fam.init(len(tasks), g)
    trained, _ = Fm.train(fam, data, tasks, start, 40, g)
    change = Fm.body_change(fam, trained)
    assert change["2.weight"] > 0.1
    before = Fm.accuracy(fam, start, data, tasks, "test")
    after = Fm.accuracy(fam, trained, data, tasks, "test")
    assert after.mean() > before.mean() + 0.5


def test_unknown_model_and_network_symmetries_are_refused(data, families):
    with pytest.raises(ConfigError, match="mlp"):
        Fm.family("transformer", data)
    s = d2nwg.demo.DemoSettings(seen=2, seeds=1, symmetries=1, head_steps=1)
    with pytest.raises(ConfigError, match="permutations"):
        d2nwg.demo.build_zoo(data, families["cnn"], make_tasks(2, 0, 0).seen, s, 0)


def test_hidden_permutation_is_an_exact_symmetry(data, families):
    """An MLP copy with permuted hidden units: other weights, the same outputs."""
    fam = families["mlp"]
    sd = Fm.unstack(fam.init(1, torch.Generator().manual_seed(0)))[0]
    copy = Fm.permute_hidden(fam, sd, torch.Generator().manual_seed(1))
    assert not torch.equal(copy["0.weight"], sd["0.weight"])
    assert torch.equal(copy["4.bias"], sd["4.bias"])
    x = data.pixels["test"][:9][None]
    torch.testing.assert_close(
        fam.logits(Fm.stack([copy], fam.names), x), fam.logits(Fm.stack([sd], fam.names), x)
    )


def test_retrieval_matches_classes(families):
    """A query whose condition is a zoo condition with its classes reordered retrieves that
    zoo model, with the class rows reordered alike."""
    fam = families["head"]
    params = fam.init(4, torch.Generator().manual_seed(0))
    tokens = torch.randn(4, WAYS, 8, generator=torch.Generator().manual_seed(1))
    memory = B.ZooMemory(fam, params, [(0, 1, 2, 3, 4)] * 4, tokens)
    perm = torch.tensor([3, 0, 4, 1, 2])
    got, index = memory.retrieve(tokens[2:3, perm])
    assert index.tolist() == [2]
    torch.testing.assert_close(got["weight"][0], params["weight"][2][perm])
    torch.testing.assert_close(got["bias"][0], params["bias"][2][perm])


def test_noise_has_the_candidates_spread():
    """zoo_noised: per task and tensor, noise as wide as the candidates around their mean."""
    g = torch.Generator().manual_seed(0)
    K = 4000
    scale = torch.tensor([0.1, 2.0])
    candidates = {"w": torch.randn(2, K, 3, generator=g).mul(scale[:, None, None]).flatten(0, 1)}
    std = B.spread(candidates, K)
    torch.testing.assert_close(std["w"].flatten(), scale, rtol=0.05, atol=0)
    base = {"w": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
    out = B.noised(base, std, K, g)["w"].view(2, K, 3)
    torch.testing.assert_close(out.mean(1), base["w"], rtol=0, atol=0.15)
    torch.testing.assert_close(out.std(1).mean(1), scale, rtol=0.05, atol=0)


def test_pairwise_mean():
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert B.pairwise_mean(v) == pytest.approx((5 + 5 + 0) / 3)


def test_cli_model_and_window(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(d2nwg.demo, "run", calls.append)
    argv = ["demo", "--model", "cnn", "--window", "8", "--quick", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert calls == [DemoOptions(str(tmp_path), quick=True, progress=False, model="cnn", window=8)]
    assert main(["demo", "--lora", "--model", "mlp", "--out", str(tmp_path)]) != 0
    assert main(["demo", "--lora", "--window", "2", "--out", str(tmp_path)]) != 0
    assert calls == [DemoOptions(str(tmp_path), quick=True, progress=False, model="cnn", window=8)]


@pytest.mark.parametrize("model, window, copies", [("mlp", 16, 2), ("head", 2, 1)])
def test_tiny_demo_with_windows(tmp_path, model, window, copies):
    """``run`` at toy size, the model cut into windows (``--window``, heads too): results.json
    holds every method of every split, the baselines, tokens, window, body change, the VAE
    round trip and the distances (null where one seed or one candidate has no pairs).
    (Toy steps: this checks the pipeline, not the generator's quality.)"""
    s = d2nwg.demo.DemoSettings(
        seen=6, unseen=2, novel=2, seeds=copies, symmetries=0, shots=5, head_steps=30,
        candidates=copies, finetune_steps=2, finetune_tasks=2, vae_steps=5, diffusion_steps=5,
    )  # fmt: skip
    o = DemoOptions(str(tmp_path), device="cpu", progress=False, model=model, window=window)
    r = d2nwg.demo.run(o, s)
    assert r["methods"] == list(d2nwg.demo.METHODS)
    assert {"retrieval", "zoo_average", "zoo_noised"} <= set(r["methods"])
    for split in ("seen", "unseen", "novel"):
        assert set(r["accuracy"][split]) == set(r["methods"])
        assert len(r["retrieved_tasks"][split]) == len(r["tasks"][split])
        assert r["novelty"][split]["nearest_zoo"] > 0
        assert len(r["novelty"][split]["per_candidate"]) == len(r["tasks"][split]) * copies
    assert r["model"] == model and r["window"] == window and r["tokens"] > window
    if model == "mlp":
        assert r["body_change"]["2.weight"] > 0.1  # the body moves per task
    else:
        assert r["body_change"] == {}  # a head has no body of its own
    assert r["accuracy"]["seen"]["zoo"] > r["accuracy"]["seen"]["random"] + 0.5
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["generator"]["config"]["window"] == window
    assert 0 <= on_disk["vae_roundtrip"]["roundtrip"] <= 1
    for name in ("accuracy.png", "novelty.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    pairs = on_disk["diversity"]["unseen"]
    assert (pairs["generated_pairwise"] is None) == (copies == 1)
    assert (pairs["zoo_same_task_pairwise"] is None) == (copies == 1)


def test_a_toy_whole_network_zoo_learns(tmp_path):
    """Whole 3-layer MLPs (every layer generated, class rows on), fitted with the library's
    networks on a toy zoo and budget: generated networks for class combinations the zoo never
    saw classify far better than a random head on the pretrained body or the zoo's average,
    and near the zoo (measured: 0.89 best, zoo 0.97, random 0.24, average 0.52)."""
    s = d2nwg.demo.DemoSettings(
        seen=16, unseen=4, novel=2, seeds=2, symmetries=0, shots=10, head_steps=60,
        candidates=3, finetune_steps=2, finetune_tasks=1, vae_steps=150, diffusion_steps=150,
    )  # fmt: skip
    o = DemoOptions(str(tmp_path), device="cpu", progress=False, model="mlp")
    r = d2nwg.demo.run(o, s)
    acc = r["accuracy"]["unseen"]
    assert r["tokens"] > 50 and r["generator"]["config"]["class_rows"] == ["4.weight"]
    assert acc["generated_best"] > acc["random"] + 0.4, acc
    assert acc["generated_best"] > max(0.8 * acc["zoo"], acc["zoo_average"] + 0.2), acc
