"""Training survives a dead rank: ``torchrun --max-restarts`` restarts the group, every rank
resumes from the last whole checkpoint (``d2nwg train --resume auto``), and the run ends with
exactly the weights of an uninterrupted run. On CPU with gloo, two processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import d2nwg
from d2nwg.files import read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"condition": "dataset", "batch_size": 8, "vae_batch": 64, "hidden_dim": 32,
          "depth": 2, "latent_dim": 8, "vae_hidden_dim": 32, "cond_dim": 16, "timesteps": 100,
          "checkpoint_every": 5, "log_every": 5, "vae_steps": 30, "diffusion_steps": 80,
          "device": "cpu"}  # fmt: skip


def _zoo(n: int) -> d2nwg.ModelZoo:
    g = torch.Generator().manual_seed(0)
    zoo = d2nwg.ModelZoo()
    for _ in range(n):
        sd = {"fc.weight": torch.randn(4, 16, generator=g), "fc.bias": torch.randn(4, generator=g)}
        zoo.add(sd, condition=torch.randn(3, 2, 5, generator=g))
    return zoo


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", D2NWG_DIST_TIMEOUT="60")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(zoo: str, cfg: str, out: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            "--nproc_per_node=2", "--max-restarts=3", "--monitor-interval=0.1",
            "-m", "d2nwg", "train", "--zoo", zoo, "--config", cfg, "--out", out,
            "--resume", "auto", "--no-progress"]  # fmt: skip


def _workers(pid: int) -> list[int]:
    """The worker processes torchrun's agent runs (its children running d2nwg)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == pid and any(e.startswith(b"RANK=") for e in environ):
            found.append(int(entry))
    return sorted(found)


def _generator(out: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("vae", "denoiser", "encoder"):
        for k, v in read_safetensors(os.path.join(out, "generator", f"{name}.safetensors"))[
            1
        ].items():
            tensors[f"{name}.{k}"] = v
    return tensors


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_killed_mid_run_restarts_and_ends_with_the_uninterrupted_weights(tmp_path):
    _zoo(16).save(tmp_path / "zoo")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_torchrun(str(tmp_path / "zoo"), str(cfg), full), check=True, env=_env(),
                   timeout=300, capture_output=True)  # fmt: skip

    rng = random.Random()
    victim_rank, after = rng.randrange(2), rng.uniform(0.0, 0.3)
    # the kill lands in the diffusion stage, after its first checkpoint, at a random moment
    proc = subprocess.Popen(_torchrun(str(tmp_path / "zoo"), str(cfg), killed), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    ckpts = os.path.join(killed, "checkpoints")
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
            if any(n.startswith("1-diffusion-") for n in names):
                break
            time.sleep(0.02)
        else:
            pytest.fail("no diffusion checkpoint appeared")
        time.sleep(after)
        workers = _workers(proc.pid)
        assert len(workers) == 2, f"expected 2 workers of torchrun, found {workers}"
        os.kill(workers[victim_rank], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    log = output.decode(errors="replace")
    assert proc.returncode == 0, f"killed worker {victim_rank} after {after:.2f}s:\n{log[-3000:]}"
    assert "exitcode: -9" in log, f"torchrun saw no worker killed:\n{log[-3000:]}"
    a, b = _generator(full), _generator(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the restart (killed rank {victim_rank})"
    rows = [json.loads(line) for line in open(os.path.join(killed, "log.jsonl"))]
    steps = [(r["stage"], r["step"]) for r in rows]
    assert steps == [
        (r["stage"], r["step"]) for r in map(json.loads, open(os.path.join(full, "log.jsonl")))
    ]
