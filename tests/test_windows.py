"""Windows and large-model generation: window layout, range writes, streaming generate_into,
sharded safetensors, selective and delta generation, and sharded generation under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import d2nwg
from d2nwg.errors import ConfigError, KeyMismatchError, ShapeError
from d2nwg.generator import D2NWG, WINDOW_DRAWS, ConditionalDenoiser, D2NWGConfig
from d2nwg.generator.export import shard_layers
from d2nwg.windows import WindowLayout, cut_windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Layers of 15, 2, 2, 8 and 1 tokens of 64 values: windows of 6 cut fc1.weight and fc2.weight,
# pack fc1.bias with norm.weight, and leave fc2.bias (the last, short layer) alone, padded.
SHAPES = {
    "fc1.weight": (24, 40),
    "fc1.bias": (96,),
    "norm.weight": (96,),
    "fc2.weight": (5, 96),
    "fc2.bias": (5,),
}
SPANS = ((0, 6), (6, 12), (12, 15), (15, 19), (19, 25), (25, 27), (27, 28))
# The default layout of the same 28 tokens: windows of 6 every 3 tokens (the last one ends at
# token 28), across layers.
SLIDING = tuple((a, a + 6) for a in range(0, 22, 3)) + ((22, 28),)
TINY = dict(
    condition="none", chunk_size=64, window=6, vae_steps=150, diffusion_steps=200,
    batch_size=16, vae_batch=128, hidden_dim=64, depth=2, latent_dim=8, vae_hidden_dim=64,
    checkpoint_every=1000, log_every=50, timesteps=100, sample_steps=10, vae_lr=3e-3, lr=3e-3,
    prediction_type="sample",
)  # fmt: skip


def target_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def toy_zoo(target: dict, n: int = 24, seed: int = 1) -> d2nwg.ModelZoo:
    g = torch.Generator().manual_seed(seed)
    zoo = d2nwg.ModelZoo()
    for _ in range(n):
        zoo.add({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in target.items()})
    return zoo


def fresh(fill: float = float("nan")) -> dict[str, torch.Tensor]:
    return {k: torch.full(s, fill) for k, s in SHAPES.items()}


def distance(sd: dict, target: dict) -> float:
    return float(sum((sd[k] - v).square().sum() for k, v in target.items()))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    target = target_weights()
    gen = D2NWG(D2NWGConfig(**TINY)).fit(toy_zoo(target), progress=False)
    directory = str(tmp_path_factory.mktemp("gen"))
    gen.save(directory)
    return gen, target, directory


# ----------------------------------------------------------------------------------------
# The layout of windows.
# ----------------------------------------------------------------------------------------
def test_cut_windows_by_hand():
    assert cut_windows([(0, 15), (15, 17), (17, 19), (19, 27), (27, 28)], 6) == list(SPANS)
    # small layers are packed while they fit whole; a layer of exactly W is a window alone
    runs = [(0, 2), (2, 5), (5, 7), (7, 10), (10, 14)]
    assert cut_windows(runs, 5) == [(0, 5), (5, 10), (10, 14)]
    assert cut_windows([(0, 1), (1, 6), (6, 7)], 5) == [(0, 1), (1, 6), (6, 7)]


@pytest.mark.parametrize("seed", range(20))
def test_windows_cover_every_token_once_and_respect_layers(seed):
    g = torch.Generator().manual_seed(seed)
    C = int(torch.randint(1, 9, (1,), generator=g))
    W = int(torch.randint(1, 7, (1,), generator=g))
    sd = {
        f"l{i}.weight": torch.zeros(int(torch.randint(0, 40, (1,), generator=g)))
        for i in range(int(torch.randint(1, 8, (1,), generator=g)))
    }
    sd["last"] = torch.zeros(3)  # at least one non-empty layer
    tok = d2nwg.WeightTokenizer.from_state_dict(sd, chunk_size=C)
    win = WindowLayout.from_tokenizer(tok, W)
    T = tok.num_tokens
    real = win.index[win.mask]
    assert torch.equal(real, torch.arange(T)), "every token exactly once, in order"
    assert bool((win.index[~win.mask] == T).all())
    assert win.index.shape == (win.num_windows, min(W, T))
    layer = tok.positions[:, 0]
    for (a, b), idx, m in zip(win.spans, win.index, win.mask):
        assert torch.equal(idx[m], torch.arange(a, b))
        layers = layer[a:b].unique()
        if len(layers) > 1:  # only whole layers that are each shorter than a window
            for s in layers.tolist():
                count = int((layer == s).sum())
                assert count < win.size and int((layer[a:b] == s).sum()) == count
    assert torch.equal(win.positions[win.mask], tok.positions)
    assert torch.equal(win.kinds[win.mask], tok.kinds)
    assert bool((win.positions[~win.mask] == 0).all())


def test_one_window_is_the_model_level_layout():
    tok = d2nwg.WeightTokenizer.from_state_dict(target_weights(), chunk_size=16)
    for W in (0, tok.num_tokens, 10 * tok.num_tokens):
        win = WindowLayout.from_tokenizer(tok, W)
        assert win.num_windows == 1 and not win.padded and win.size == tok.num_tokens
    with pytest.raises(ConfigError, match="window"):
        WindowLayout.from_tokenizer(tok, -1)


# ----------------------------------------------------------------------------------------
# Range writes: streaming's detokenize.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("seed", range(4))
def test_write_range_pieces_equal_whole_detokenize(granularity, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * (1 + i) + i for i, (k, s) in enumerate(SHAPES.items())}
    sd["half"] = torch.randn(7, 3, generator=g).half()
    tok = d2nwg.WeightTokenizer.from_state_dict(sd, chunk_size=16, granularity=granularity)
    tok.fit([sd])
    tokens = torch.randn(tok.num_tokens, 16, generator=g)
    whole = tok.detokenize(tokens[None])[0]
    pieces = {k: torch.full_like(v, float("nan")) for k, v in whole.items()}
    dests = tok.destinations(pieces)
    cuts = sorted(set(torch.randint(0, tok.num_tokens, (4,), generator=g).tolist()))
    bounds = [0, *cuts, tok.num_tokens]
    for a, b in zip(bounds, bounds[1:]):
        tok.write_range(dests, tokens[a:b], a)
    for k in whole:  # the same kernel on the same values: equal to the last bit
        assert torch.equal(pieces[k], whole[k]), k
    # accumulate adds the same values once more
    tok.write_range(dests, tokens, 0, accumulate=True)
    for k in whole:
        assert torch.allclose(pieces[k].double(), 2 * whole[k].double(), rtol=1e-3), k


def test_write_range_skips_absent_layers_and_checks_shapes():
    sd = target_weights()
    tok = d2nwg.WeightTokenizer.from_state_dict(sd, chunk_size=16)
    tokens = torch.randn(tok.num_tokens, 16)
    part = {"fc2.weight": torch.zeros(5, 96)}
    tok.write_range(tok.destinations(part, partial=True), tokens, 0)
    assert torch.equal(part["fc2.weight"], tok.detokenize(tokens[None])[0]["fc2.weight"])
    with pytest.raises(KeyMismatchError, match="lacks keys"):
        tok.destinations(part)
    with pytest.raises(ShapeError, match="do not lie"):
        tok.write_range(tok.destinations(sd), tokens, 5)
    bad = dict(sd, **{"fc1.weight": torch.zeros(40, 24).t()})  # non-contiguous, split
    with pytest.raises(ShapeError, match="not contiguous"):
        tok.write_range(tok.destinations(bad), tokens[3:9], 3)


# ----------------------------------------------------------------------------------------
# Windowed generation.
# ----------------------------------------------------------------------------------------
def test_windowed_generator_learns_the_zoo(fitted):
    gen, target, _ = fitted
    assert gen.windows.spans == SLIDING and not gen.windows.padded
    sds = gen.generate(num_samples=4, seed=0)
    g = torch.Generator().manual_seed(1)
    random = {k: (torch.rand(v.shape, generator=g) * 2 - 1) / 4 for k, v in target.items()}
    generated = sum(distance(sd, target) for sd in sds) / len(sds)
    # zoo spread: 0.05^2 * 1637 = 4; random initialization ~ 1700 away
    assert generated < 0.05 * distance(random, target), generated


@pytest.mark.parametrize(
    "window, window_batch, pairs",
    [(6, 0, 16 * 4), (6, 10, 10), (0, 0, 16)],  # 7 windows of 6 per model, 4 drawn; 16 models
)
def test_a_training_step_draws_several_windows_per_model(monkeypatch, window, window_batch, pairs):
    """Windowed, a diffusion step draws up to WINDOW_DRAWS windows of each of its models (one
    each gave a step a seventh of the tokens here), or ``window_batch`` (model, window) pairs."""
    assert len(SPANS) == 7 and WINDOW_DRAWS == 4
    seen, forward = [], ConditionalDenoiser.forward

    def spy(self, x0, *args, **kwargs):
        seen.append(tuple(x0.shape[:2]))
        return forward(self, x0, *args, **kwargs)

    monkeypatch.setattr(ConditionalDenoiser, "forward", spy)
    steps = dict(vae_steps=2, diffusion_steps=3)
    cfg = D2NWGConfig(**{**TINY, **steps, "window": window, "window_batch": window_batch})
    D2NWG(cfg).fit(toy_zoo(target_weights()), progress=False)
    assert seen == [(pairs, window or 28)] * 3


@pytest.mark.parametrize("batch_windows", [1, 3, 7])
def test_streaming_equals_the_plain_way(fitted, batch_windows):
    gen, _, _ = fitted
    plain = gen.generate(num_samples=1, seed=5)[0]
    streamed = gen.generate_into(fresh(), seed=5, batch_windows=batch_windows)
    for k in plain:
        assert not bool(streamed[k].isnan().any()), f"{k} not fully written"
        torch.testing.assert_close(streamed[k], plain[k], rtol=1e-4, atol=1e-5)


def test_windows_do_not_depend_on_batch_or_neighbours(fitted):
    gen, _, _ = fitted
    one = gen.generate_tokens(num_samples=3, seed=2, batch_windows=1)
    many = gen.generate_tokens(num_samples=3, seed=2)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gen.generate_tokens(num_samples=1, seed=2), many[:1])


def test_shards_reassemble_into_the_same_weights(fitted, tmp_path):
    gen, _, _ = fitted
    streamed = gen.generate_into(fresh(), seed=4)
    # fc1.weight (3840 B) alone; fc1.bias + norm.weight (768 B); fc2.weight + fc2.bias
    index = gen.generate_to_directory(tmp_path, seed=4, shard_size=2400)
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    on_disk = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert on_disk == index and set(index["weight_map"]) == set(SHAPES)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in streamed.values())
    merged = {}
    for name in files:
        part = load_file(str(tmp_path / name))
        assert all(index["weight_map"][k] == name for k in part)
        merged.update(part)
    for k in SHAPES:
        torch.testing.assert_close(merged[k], streamed[k], rtol=1e-4, atol=1e-5)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_shard_layers_by_size():
    tok = d2nwg.WeightTokenizer.from_state_dict(target_weights(), chunk_size=16)
    assert shard_layers(tok.layers, 2400) == [[0], [1, 2], [3, 4]]
    assert shard_layers(tok.layers, 1) == [[0], [1], [2], [3], [4]]
    assert shard_layers(tok.layers, 10**9) == [[0, 1, 2, 3, 4]]


def test_generation_option_errors(fitted, tmp_path):
    gen, _, _ = fitted
    with pytest.raises(ConfigError, match="unknown sampling option"):
        gen.generate_into(fresh(), seeed=1)
    with pytest.raises(ConfigError, match="batch_windows"):
        gen.generate_into(fresh(), batch_windows=0)
    with pytest.raises(ConfigError, match="shard_size"):
        gen.generate_to_directory(tmp_path, shard_size=0)
    with pytest.raises(ConfigError, match="delta=True"):
        gen.generate(base=target_weights())
    with pytest.raises(KeyMismatchError, match="lacks keys"):
        gen.generate_into({"fc1.weight": torch.zeros(24, 40)})


def test_selective_generation_touches_only_chosen_layers():
    target = target_weights()
    cfg = D2NWGConfig(**dict(TINY, vae_steps=20, diffusion_steps=20, include=["fc2.*"]))
    gen = D2NWG(cfg).fit(toy_zoo(target, n=8), progress=False)
    assert gen.tokenizer.layer_names == ["fc2.weight", "fc2.bias"]
    model = fresh(7.0)
    gen.generate_into(model, seed=0)
    for k in ("fc1.weight", "fc1.bias", "norm.weight"):
        assert bool((model[k] == 7.0).all()), f"{k} was touched"
    assert not bool((model["fc2.weight"] == 7.0).any())


def test_delta_generation_adds_residuals_to_the_base(tmp_path):
    base = target_weights(seed=3)
    task = {k: 0.3 * torch.ones(s) for k, s in SHAPES.items()}  # what fine-tuning learned
    zoo = toy_zoo({k: base[k] + task[k] for k in SHAPES}, n=16)
    cfg = D2NWGConfig(**dict(TINY, delta=True, exclude=["norm.*"]))
    gen = D2NWG(cfg).fit(zoo, base=base, progress=False)
    # the tokenizer saw residuals: their mean is the task's 0.3, not the base's
    assert torch.allclose(gen.tokenizer.mean.float(), torch.full((4,), 0.3), atol=0.05)
    sds = gen.generate(num_samples=2, seed=1, base=base)
    for sd in sds:
        for k in ("fc1.weight", "fc2.weight"):
            assert float((sd[k] - base[k] - task[k]).abs().mean()) < 0.15, k
    model = {k: v.clone() for k, v in base.items()}
    gen.generate_into(model, seed=1, batch_windows=2)
    assert torch.equal(model["norm.weight"], base["norm.weight"]), "excluded layer touched"
    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        torch.testing.assert_close(model[k], sds[0][k], rtol=1e-4, atol=1e-5)
    index = gen.generate_to_directory(tmp_path, seed=1, base=base)
    assert index["metadata"]["delta"] is True
    merged = load_file(str(tmp_path / "model-00001-of-00001.safetensors"))
    torch.testing.assert_close(merged["fc1.weight"], sds[0]["fc1.weight"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="pass base="):
        gen.generate()
    with pytest.raises(ConfigError, match="pass base="):
        D2NWG(cfg).fit(zoo, progress=False)


def test_saved_windowed_generator_generates_the_same(fitted):
    gen, _, directory = fitted
    loaded = D2NWG.load(directory)
    assert loaded.windows.spans == gen.windows.spans
    a, b = gen.generate(seed=9)[0], loaded.generate(seed=9)[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------
# Sharded generation under torchrun: two gloo processes write what one process writes.
# ----------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from d2nwg.generator import WINDOW_DRAWS, ConditionalDenoiser, D2NWG
    from d2nwg.files import save_safetensors
    gen_dir, out = sys.argv[1], sys.argv[2]
    gen = D2NWG.load(gen_dir)
    gen.generate_to_directory(os.path.join(out, "shards"), seed=6, shard_size=2400,
                              batch_windows=2)
    shapes = {n: s.shape for s in gen.tokenizer.layers for n in [s.name]}
    model = {k: torch.full(s, float("nan")) for k, s in shapes.items()}
    gen.generate_into(model, seed=6, batch_windows=2, distributed=True)
    rank = os.environ.get("RANK", "0")
    save_safetensors(model, os.path.join(out, f"into-rank{rank}.safetensors"), {})
""")


def _run(tmp_path, directory, out, nproc):
    script = tmp_path / "shard_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run(
        [*launch, str(script), directory, str(out)],
        check=True, env=env, timeout=300, capture_output=True,
    )  # fmt: skip


def test_two_process_sharded_generation_is_bit_identical(fitted, tmp_path):
    _, _, directory = fitted
    one, two = tmp_path / "one", tmp_path / "two"
    _run(tmp_path, directory, one, 1)
    _run(tmp_path, directory, two, 2)
    names = sorted(os.listdir(one / "shards"))
    assert names == sorted(os.listdir(two / "shards")) and len(names) == 4
    for name in names:
        assert (one / "shards" / name).read_bytes() == (two / "shards" / name).read_bytes(), name
    whole = load_file(str(one / "into-rank0.safetensors"))
    parts = [load_file(str(two / f"into-rank{r}.safetensors")) for r in (0, 1)]
    for k, v in whole.items():
        written = [~p[k].isnan() for p in parts]
        assert torch.equal(written[0] ^ written[1], torch.ones_like(v, dtype=torch.bool)), k
        assert torch.equal(torch.where(written[0], parts[0][k], parts[1][k]), v), k


def test_cli_generate_shards(fitted, tmp_path, capsys):
    from d2nwg.cli import main

    gen, _, directory = fitted
    out = tmp_path / "model"
    args = ["generate", "--generator", directory, "--seed", "4", "--out", str(out)]
    assert main([*args, "--shards", "--batch-windows", "2"]) == 0
    assert sorted(os.listdir(out)) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    written = load_file(str(out / "model-00001-of-00001.safetensors"))
    streamed = gen.generate_into(fresh(), seed=4)
    for k in SHAPES:
        torch.testing.assert_close(written[k], streamed[k], rtol=1e-4, atol=1e-5)
    assert main([*args, "--shards", "--num", "2"]) == 2
    assert "use --num 1" in capsys.readouterr().err
