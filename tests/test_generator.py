"""The generator end to end: fit / generate / save / load, seeds, exact resume after SIGKILL,
two-process DDP, the CLI and its errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import d2nwg
from d2nwg.cli import main
from d2nwg.files import read_safetensors, save_safetensors
from d2nwg.generator import D2NWG, D2NWGConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    vae_steps=150,
    diffusion_steps=150,
    batch_size=16,
    vae_batch=128,
    hidden_dim=64,
    depth=2,
    latent_dim=8,
    vae_hidden_dim=64,
    cond_dim=32,
    checkpoint_every=50,
    log_every=10,
    timesteps=100,
    sample_steps=10,
    vae_lr=3e-3,
    lr=3e-3,
    prediction_type="sample",
)


def toy_zoo(n: int = 24, conditional: bool = False, seed: int = 0) -> tuple[d2nwg.ModelZoo, dict]:
    """Models near one target: w = w* + 0.05 noise (a 'task' whose solution is w*)."""
    g = torch.Generator().manual_seed(seed)
    target = {"fc.weight": torch.randn(4, 16, generator=g), "fc.bias": torch.randn(4, generator=g)}
    zoo = d2nwg.ModelZoo()
    for i in range(n):
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in target.items()}
        cond = torch.randn(3, 2, 5, generator=g) if conditional else None
        zoo.add(sd, condition=cond, meta={"i": i})
    return zoo, target


def _distance(sd: dict, target: dict) -> float:
    return float(sum((sd[k] - v).square().sum() for k, v in target.items()))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[D2NWG, dict, str]:
    zoo, target = toy_zoo()
    out = str(tmp_path_factory.mktemp("run"))
    gen = D2NWG(D2NWGConfig(condition="none", **TINY)).fit(zoo, out=out, progress=False)
    return gen, target, out


def test_generated_weights_beat_random(fitted):
    gen, target, _ = fitted
    sds = gen.generate(num_samples=6, seed=0)
    assert len(sds) == 6 and set(sds[0]) == set(target)
    assert all(
        sd[k].shape == v.shape and sd[k].dtype == v.dtype for sd in sds for k, v in target.items()
    )
    generated = sum(_distance(sd, target) for sd in sds) / len(sds)
    g = torch.Generator().manual_seed(1)
    random = {
        "fc.weight": (torch.rand(4, 16, generator=g) * 2 - 1) / 4,
        "fc.bias": (torch.rand(4, generator=g) * 2 - 1) / 4,
    }
    # the zoo's own spread is 0.05^2 * 68 = 0.17; random initialization is ~70 away
    assert generated < 1.0 < 0.1 * _distance(random, target), (generated, _distance(random, target))


def test_log_and_checkpoints_written(fitted):
    _, _, out = fitted
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert {r["stage"] for r in rows} == {"vae", "diffusion"}
    assert [r["step"] for r in rows if r["stage"] == "diffusion"] == list(range(10, 151, 10))
    assert all(r["loss"] > 0 and r["steps_per_s"] > 0 for r in rows)
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == ["1-diffusion-00000100.safetensors", "1-diffusion-00000150.safetensors"]


def test_sample_i_does_not_depend_on_num_samples(fitted):
    gen = fitted[0]
    few = gen.generate(num_samples=2, seed=3)
    many = gen.generate(num_samples=5, seed=3)
    other = gen.generate(num_samples=2, seed=4)
    for a, b in zip(few, many[:2]):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(few[0]["fc.weight"], other[0]["fc.weight"])
    assert not torch.allclose(many[0]["fc.weight"], many[1]["fc.weight"])


def test_generate_into_module_and_save_load(fitted, tmp_path):
    gen = fitted[0]
    gen.save(tmp_path / "gen")
    assert sorted(os.listdir(tmp_path / "gen")) == [
        "config.json",
        "denoiser.safetensors",
        "tokenizer.safetensors",
        "vae.safetensors",
    ]
    loaded = D2NWG.load(tmp_path / "gen")
    a = gen.generate(num_samples=2, seed=7)
    b = loaded.generate(num_samples=2, seed=7)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(16, 4))
    loaded.generate_into(model, seed=7)  # sample 0 of seed 7 (batch of 1: same to rounding)
    torch.testing.assert_close(model.fc.weight.detach(), a[0]["fc.weight"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.fc.bias.detach(), a[0]["fc.bias"], rtol=1e-5, atol=1e-5)


def test_load_rejects_bad_directories(fitted, tmp_path):
    gen = fitted[0]
    gen.save(tmp_path / "gen")
    os.remove(tmp_path / "gen" / "vae.safetensors")
    with pytest.raises(d2nwg.FileFormatError, match="vae.safetensors"):
        D2NWG.load(tmp_path / "gen")
    gen.save(tmp_path / "gen2")
    with open(tmp_path / "gen2" / "denoiser.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(d2nwg.FileFormatError, match="denoiser.safetensors"):
        D2NWG.load(tmp_path / "gen2")
    gen.save(tmp_path / "gen3")
    cfg = json.loads((tmp_path / "gen3" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "gen3" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(d2nwg.FileFormatError, match="config.json"):
        D2NWG.load(tmp_path / "gen3")
    with pytest.raises(d2nwg.FileFormatError, match="config.json"):
        D2NWG.load(tmp_path / "nothing")


def test_conditional_generator_and_condition_errors(tmp_path):
    zoo, _ = toy_zoo(12, conditional=True)
    cfg = D2NWGConfig(condition="dataset", **{**TINY, "vae_steps": 10, "diffusion_steps": 10})
    gen = D2NWG(cfg).fit(zoo, progress=False)
    one = gen.generate(torch.randn(3, 2, 5), num_samples=2, guidance_scale=2.0)
    assert len(one) == 2
    batch = gen.generate(torch.randn(4, 3, 2, 5), num_samples=3)
    assert len(batch) == 12
    varying = gen.generate([torch.randn(3, 4, 5), torch.randn(2, 1, 5)], num_samples=1)
    assert len(varying) == 2
    with pytest.raises(d2nwg.ShapeError, match="F = 5"):
        gen.generate(torch.randn(3, 2, 6))
    with pytest.raises(d2nwg.ConfigError, match="condition"):
        gen.generate(None)
    with pytest.raises(d2nwg.ConfigError, match="num_samples"):
        gen.generate(torch.randn(3, 2, 5), num_samples=0)
    with pytest.raises(d2nwg.ConfigError, match="condition='none'"):
        D2NWG(D2NWGConfig(condition="none", **TINY)).fit(zoo, progress=False)
    unconditional, _ = toy_zoo(4)
    with pytest.raises(d2nwg.ConfigError, match="needs zoo conditions"):
        D2NWG(cfg).fit(unconditional, progress=False)


def test_config_validation():
    with pytest.raises(d2nwg.ConfigError, match="condition"):
        D2NWGConfig(condition="image")
    with pytest.raises(d2nwg.ConfigError, match="chunk_size"):
        D2NWGConfig(chunk_size="64")
    with pytest.raises(d2nwg.ConfigError, match="lr"):
        D2NWGConfig(lr=float("nan"))
    with pytest.raises(d2nwg.ConfigError, match="vae_steps"):
        D2NWGConfig(vae_steps=True)
    with pytest.raises(d2nwg.ConfigError, match="unknown keys"):
        D2NWGConfig.from_dict({"chunk_sise": 64})
    cfg = D2NWGConfig().resolve(num_params=325, cond_features=64)
    assert (cfg.chunk_size, cfg.latent_dim, cfg.hidden_dim, cfg.depth) == (64, 64, 128, 4)
    big = D2NWGConfig().resolve(num_params=3_000_000, cond_features=0)
    assert big.chunk_size == 4096 and big.depth == 6
    assert D2NWGConfig.from_dict(cfg.to_dict()) == cfg
    short = D2NWGConfig(diffusion_steps=5).resolve(num_params=325, cond_features=64)
    assert short.ema_decay == 0.0  # 1 - 10 / 5 < 0: no averaging, not a negative decay


# ----------------------------------------------------------------------------------------
# Exact resume after SIGKILL, and DDP: subprocesses running a small fit.
# ----------------------------------------------------------------------------------------
FIT_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_generator import toy_zoo, TINY
    from d2nwg.generator import D2NWG, D2NWGConfig
    out, resume = sys.argv[1], sys.argv[2] == "1"
    cfg = D2NWGConfig(condition="dataset", **{{**TINY, "checkpoint_every": 5,
                                              "vae_steps": 40, "diffusion_steps": 60}})
    gen = D2NWG(cfg).fit(toy_zoo(16, conditional=True)[0], out=out, resume=resume, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    from d2nwg.nn import save_module
    save_module(gen.model, os.path.join(out, f"final-rank{{rank}}.safetensors"))
    save_module(gen.vae, os.path.join(out, f"vae-rank{{rank}}.safetensors"))
""")


def _script(tmp_path) -> str:
    path = tmp_path / "fit_script.py"
    path.write_text(FIT_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    return str(path)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _tensors(path) -> dict:
    return read_safetensors(path)[1]


def test_resume_after_sigkill_is_exact(tmp_path):
    script = _script(tmp_path)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run([sys.executable, script, full, "0"], check=True, env=_env(), timeout=300)
    ckpts = os.path.join(killed, "checkpoints")
    proc = subprocess.Popen([sys.executable, script, killed, "0"], env=_env())
    try:  # kill in the diffusion stage, between checkpoints
        deadline = time.time() + 240
        while time.time() < deadline:
            names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
            if any(n.startswith("1-diffusion-0000001") for n in names):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no diffusion checkpoint appeared")
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert not os.path.exists(os.path.join(killed, "final-rank0.safetensors"))
    subprocess.run([sys.executable, script, killed, "1"], check=True, env=_env(), timeout=300)
    for name in ("final-rank0.safetensors", "vae-rank0.safetensors"):
        a, b = _tensors(os.path.join(full, name)), _tensors(os.path.join(killed, name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"


def test_two_process_gloo_fit_ends_identical(tmp_path):
    script = _script(tmp_path)
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        script,
        out,
        "0",
    ]
    subprocess.run(cmd, check=True, env=_env(), timeout=300, capture_output=True)
    a, b = (
        _tensors(os.path.join(out, "final-rank0.safetensors")),
        _tensors(os.path.join(out, "final-rank1.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert rows and rows[-1]["stage"] == "diffusion" and rows[-1]["step"] == 60


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------
def test_cli_train_and_generate(tmp_path, capsys):
    zoo, _ = toy_zoo(8)
    zoo.save(tmp_path / "zoo")
    (tmp_path / "cfg.json").write_text(
        json.dumps({"condition": "none", **TINY, "vae_steps": 10, "diffusion_steps": 10})
    )
    assert (
        main(
            [
                "train",
                "--zoo",
                str(tmp_path / "zoo"),
                "--config",
                str(tmp_path / "cfg.json"),
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert os.path.exists(tmp_path / "run" / "generator" / "config.json")
    assert (
        main(
            [
                "generate",
                "--generator",
                str(tmp_path / "run" / "generator"),
                "--num",
                "3",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "samples"),
            ]
        )
        == 0
    )
    files = sorted(os.listdir(tmp_path / "samples"))
    assert files == [f"sample_{i:05d}.safetensors" for i in range(3)]
    sd = _tensors(tmp_path / "samples" / files[0])
    assert sd["fc.weight"].shape == (4, 16)
    # same seed -> same files
    assert (
        main(
            [
                "generate",
                "--generator",
                str(tmp_path / "run" / "generator"),
                "--num",
                "1",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    torch.testing.assert_close(
        _tensors(tmp_path / "again" / files[0])["fc.weight"], sd["fc.weight"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--zoo", "{tmp}/missing", "--out", "{tmp}/run"], "missing"),
        (
            ["train", "--zoo", "{tmp}/zoo", "--config", "{tmp}/bad.json", "--out", "{tmp}/run"],
            "bad.json",
        ),
        (
            ["train", "--zoo", "{tmp}/zoo", "--config", "{tmp}/unknown.json", "--out", "{tmp}/run"],
            "chunk_sise",
        ),
        (
            [
                "train",
                "--zoo",
                "{tmp}/zoo",
                "--config",
                "{tmp}/wrongtype.json",
                "--out",
                "{tmp}/run",
            ],
            "vae_steps",
        ),
        (["generate", "--generator", "{tmp}/nogen", "--out", "{tmp}/s"], "config.json"),
        (["generate", "--generator", "{tmp}/zoo", "--out", "{tmp}/s"], "config.json"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, expected):
    zoo, _ = toy_zoo(2)
    zoo.save(tmp_path / "zoo")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "unknown.json").write_text(json.dumps({"chunk_sise": 64}))
    (tmp_path / "wrongtype.json").write_text(json.dumps({"vae_steps": "ten"}))
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2nwg: error:") and expected in err and "\n" not in err, err


@pytest.mark.parametrize("flag", [["--device", "tpu9"], ["--seed", "-1"], ["--nope"]])
def test_cli_bad_flags_exit_nonzero_without_traceback(flag):
    proc = subprocess.run(
        [sys.executable, "-m", "d2nwg", "demo", *flag],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error" in proc.stderr


def test_cli_generate_condition_file_errors(fitted, tmp_path, capsys):
    gen = fitted[0]
    gen.save(tmp_path / "gen")
    save_safetensors({"other": torch.zeros(1)}, tmp_path / "cond.safetensors", {})
    assert (
        main(
            [
                "generate",
                "--generator",
                str(tmp_path / "gen"),
                "--condition",
                str(tmp_path / "cond.safetensors"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "cond.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("prediction_type", d2nwg.PREDICTION_TYPES)
def test_diffusion_loss_targets_match_the_samplers_conversions(prediction_type):
    """A model that outputs NoiseSchedule.target exactly has zero loss, and the samplers'
    conversion of that output gives back x0 and the noise (one set of names for both)."""
    from d2nwg.nn.denoiser import diffusion_loss
    from d2nwg.ops.sampler_step_op import AO, AX, EO, EX
    from d2nwg.sampling import prediction_coefficients

    g = torch.Generator().manual_seed(0)
    sched = d2nwg.NoiseSchedule.linear(1000)
    x0 = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 900, 999])
    target = sched.target(x0, noise, t, prediction_type)

    def oracle(x_t, t_, cond=None):
        return target

    assert (
        float(diffusion_loss(oracle, x0, sched, t, noise, prediction_type=prediction_type)) == 0.0
    )
    wrong = [p for p in d2nwg.PREDICTION_TYPES if p != prediction_type][0]
    assert float(diffusion_loss(oracle, x0, sched, t, noise, prediction_type=wrong)) > 0.1
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(
        x_t, sched.alphas[t].view(-1, 1, 1) * x0 + sched.sigmas_t[t].view(-1, 1, 1) * noise
    )
    cols = prediction_coefficients(sched.alphas_cumprod[t], prediction_type)

    def col(name):
        return cols[name].view(-1, 1, 1)

    torch.testing.assert_close(col(AX) * x_t + col(AO) * target, x0)
    torch.testing.assert_close(col(EX) * x_t + col(EO) * target, noise)
    # padding tokens (mask False) do not count: garbage there leaves the loss at 0
    mask = torch.tensor([True, True, False])
    garbage = target.clone()
    garbage[:, 2] = 1e3

    def padded_oracle(x_t, t_, cond=None, mask=None):
        assert mask is not None  # the model sees the mask too
        return garbage

    assert (
        float(
            diffusion_loss(
                padded_oracle, x0, sched, t, noise, prediction_type=prediction_type, mask=mask
            )
        )
        == 0.0
    )
    assert (
        float(diffusion_loss(oracle, x0, sched, t, noise, prediction_type=prediction_type)) == 0.0
    )


def test_quick_demo_end_to_end(tmp_path):
    """`d2nwg demo --quick` (what CI runs): results.json, plots and the generator."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "d2nwg", "demo", "--quick", "--no-progress", "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 1
    assert set(results["tasks"]) == set(results["accuracy"]) == {"seen", "unseen", "novel"}
    for split, acc in results["accuracy"].items():
        assert set(acc) == set(results["methods"])
        assert {"generated_best", "generated_mean", "zoo", "random", "retrieval"} <= set(acc)
        assert acc["zoo"] > 0.9 and acc["random"] < 0.5, (split, acc)
        assert acc["generated_best"] >= acc["generated_mean"], (split, acc)
    assert results["accuracy"]["seen"]["generated_best"] > results["accuracy"]["seen"]["random"]
    steps = results["finetune"]["steps_to_target"]
    assert set(steps) == {"generated", "random"}
    assert (out / "generator" / "config.json").exists()
    for name in ("accuracy.png", "finetune.png", "losses.png"):
        assert (out / name).stat().st_size > 1000, name
    D2NWG.load(out / "generator")


def test_cli_generate_stores_tied_weights_once(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    zoo = d2nwg.ModelZoo()
    for _ in range(4):
        w = torch.randn(4, 16, generator=g)
        zoo.add({"embed.weight": w, "head.weight": w, "bias": torch.randn(4, generator=g)})
    cfg = D2NWGConfig(condition="none", **{**TINY, "vae_steps": 5, "diffusion_steps": 5})
    D2NWG(cfg).fit(zoo, progress=False).save(tmp_path / "gen")
    assert (
        main(["generate", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "s")]) == 0
    )
    with safe_open(str(tmp_path / "s" / "sample_00000.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["bias", "embed.weight"]
        assert json.loads(f.metadata()["aliases"]) == {"head.weight": "embed.weight"}
