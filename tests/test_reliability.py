"""Reliability of what the generator writes: one writer per directory (fit's ``out``,
``generate_to_directory``, ``save``), and a run whose loss turns NaN or Inf stops with
NonFiniteError naming the stage and step, leaving its last good checkpoint as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import d2nwg
from d2nwg.files import LOCK_NAME, read_safetensors
from d2nwg.generator import D2NWG, D2NWGConfig

TINY = dict(condition="none", vae_steps=20, diffusion_steps=20, batch_size=8, vae_batch=64,
            hidden_dim=32, depth=1, latent_dim=8, vae_hidden_dim=32, timesteps=50,
            sample_steps=4, checkpoint_every=5, log_every=5, device="cpu")  # fmt: skip


def _zoo(n: int = 8) -> d2nwg.ModelZoo:
    g = torch.Generator().manual_seed(0)
    zoo = d2nwg.ModelZoo()
    for _ in range(n):
        zoo.add(
            {"fc.weight": torch.randn(4, 16, generator=g), "fc.bias": torch.randn(4, generator=g)}
        )
    return zoo


@pytest.fixture(scope="module")
def fitted() -> D2NWG:
    return D2NWG(D2NWGConfig(**TINY)).fit(_zoo(), progress=False)


def _snapshot(directory) -> dict[str, str]:
    """Every file under ``directory`` (but a lock) and a hash of its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name != LOCK_NAME:
                path = os.path.join(root, name)
                out[os.path.relpath(path, directory)] = hashlib.sha256(
                    open(path, "rb").read()
                ).hexdigest()
    return out


@pytest.fixture
def holder(tmp_path):
    """A live process holding a directory's lock (what a running writer does)."""
    procs = []

    def hold(directory) -> int:
        code = (f"import sys, time; from d2nwg.files import directory_lock\n"
                f"with directory_lock({str(directory)!r}):\n"
                f"    print('held', flush=True); time.sleep(120)")  # fmt: skip
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.getcwd()))  # fmt: skip
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p.pid

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_fit_in_the_same_out_is_refused_and_leaves_the_first_runs_files(tmp_path, holder):
    out = tmp_path / "run"
    D2NWG(D2NWGConfig(**TINY)).fit(_zoo(), out=out, progress=False)  # the first run's files
    before = _snapshot(out)
    assert any(k.startswith("checkpoints") for k in before) and "log.jsonl" in before
    pid = holder(out)
    for resume in (False, True, "auto"):
        with pytest.raises(d2nwg.DirectoryLockedError, match=rf"{out}.*pid {pid}"):
            D2NWG(D2NWGConfig(**TINY)).fit(_zoo(), out=out, resume=resume, progress=False)
    assert _snapshot(out) == before


def test_generate_to_directory_and_save_have_one_writer(tmp_path, fitted, holder):
    shards, saved = tmp_path / "shards", tmp_path / "gen"
    fitted.generate_to_directory(shards, seed=1)
    fitted.save(saved)
    before = {"shards": _snapshot(shards), "gen": _snapshot(saved)}
    pids = holder(shards), holder(saved)
    with pytest.raises(d2nwg.DirectoryLockedError, match=rf"{shards}.*pid {pids[0]}"):
        fitted.generate_to_directory(shards, seed=2)
    with pytest.raises(d2nwg.DirectoryLockedError, match=rf"{saved}.*pid {pids[1]}"):
        fitted.save(saved)
    assert {"shards": _snapshot(shards), "gen": _snapshot(saved)} == before


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, fitted):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for directory in (tmp_path / "gen", tmp_path / "shards", tmp_path / "run"):
        directory.mkdir()
        (directory / LOCK_NAME).write_text(
            json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": time.time()})
        )
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'gen'}.*{dead.pid}"):
        fitted.save(tmp_path / "gen")
    with pytest.warns(UserWarning, match=str(dead.pid)):
        fitted.generate_to_directory(tmp_path / "shards", seed=1)
    with pytest.warns(UserWarning, match=str(dead.pid)):
        D2NWG(D2NWGConfig(**TINY)).fit(_zoo(), out=tmp_path / "run", progress=False)
    assert D2NWG.load(tmp_path / "gen").generate(seed=3)[0].keys() == {"fc.weight", "fc.bias"}
    for directory in ("gen", "shards", "run"):
        assert not (tmp_path / directory / LOCK_NAME).exists(), "the lock was not released"


# ----------------------------------------------------------------------------------------
# A loss that turns non-finite.
# ----------------------------------------------------------------------------------------
def _poison_after(monkeypatch, target, name: str, calls: int) -> None:
    """``target.name`` returns NaN from its call number ``calls + 1`` on."""
    original, seen = getattr(target, name), {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["n"] += 1
        if seen["n"] > calls:
            loss = out["loss"] if isinstance(out, dict) else out
            loss = loss * float("nan")
            return {**out, "loss": loss} if isinstance(out, dict) else loss
        return out

    monkeypatch.setattr(target, name, poisoned)


@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, stage
):
    out = tmp_path / "run"
    if stage == "vae":
        _poison_after(monkeypatch, d2nwg.ChunkVAE, "loss", 12)  # the 13th step's loss is NaN
    else:
        import d2nwg.generator.networks as networks

        _poison_after(monkeypatch, networks, "diffusion_loss", 12)
    with pytest.raises(d2nwg.NonFiniteError, match=rf"stage '{stage}'.*step 13"):
        D2NWG(D2NWGConfig(**TINY)).fit(_zoo(), out=out, progress=False)
    ckpts = sorted(os.listdir(out / "checkpoints"))
    index = 0 if stage == "vae" else 1
    assert ckpts[-1] == f"{index}-{stage}-00000010.safetensors", ckpts
    for name in ckpts:
        for key, t in read_safetensors(out / "checkpoints" / name)[1].items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (name, key)
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all(r["loss"] == r["loss"] for r in logged) and logged[-1]["stage"] == stage
    assert logged[-1]["step"] == 10
    # and the run resumes from that checkpoint once the cause is gone
    monkeypatch.undo()
    D2NWG(D2NWGConfig(**TINY)).fit(_zoo(), out=out, resume=True, progress=False)
