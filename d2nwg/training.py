"""What the generator's training loops share: the learning-rate schedule, the EMA of weights,
checkpoints that restore a run exactly, the loss log and the torch.distributed context.

Resuming is exact on CPU: a checkpoint holds every module, the optimizer, the EMA, the step
and the state of every random generator of every rank, and training draws all of its
randomness from those generators, so a run killed at any moment and resumed from its last
checkpoint computes the same steps again and ends with the same bits as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from d2nwg.errors import ConfigError, FileFormatError
from d2nwg.files import read_safetensors, save_safetensors

CHECKPOINT_FORMAT = "d2nwg.checkpoint/1"


# ----------------------------------------------------------------------------------------
# Learning rate and EMA.
# ----------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's floating parameters.

    ``decay`` ramps up as ``min(decay, (1 + k) / (10 + k))`` over the first updates, so a
    short run is not dominated by its random initialization.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        state = module.state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[k] for k in names], [state[k].detach() for k in names], 1.0 - d
        )

    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (non-floating buffers are left as they are)."""
        module.load_state_dict(self.shadow, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


# ----------------------------------------------------------------------------------------
# Nested Python state <-> (tensors, JSON) for safetensors checkpoints (no pickle).
# ----------------------------------------------------------------------------------------
def pack_state(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten nested dicts / lists / tuples of tensors and JSON scalars (optimizer states,
    RNG states, counters) into safetensors' flat tensor dict plus a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().to("cpu", copy=True).contiguous()
            return {"$t": path}
        if isinstance(x, dict):
            return {
                "$d": [
                    [enc(k, f"{path}.k{i}"), enc(v, f"{path}.{i}")]
                    for i, (k, v) in enumerate(x.items())
                ]
            }
        if isinstance(x, (list, tuple)):
            return {
                "$l" if isinstance(x, list) else "$u": [
                    enc(v, f"{path}.{i}") for i, v in enumerate(x)
                ]
            }
        if isinstance(x, float) and not math.isfinite(x):
            return {"$f": repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise ConfigError(f"cannot checkpoint a {type(x).__name__} at {path}")

    return tensors, json.dumps(enc(obj, "s"))


def unpack_state(tensors: dict[str, torch.Tensor], skeleton: str) -> Any:
    """The inverse of :func:`pack_state`."""

    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            ((tag, v),) = x.items()
            if tag == "$t":
                return tensors[v]
            if tag == "$d":
                return {dec(k): dec(val) for k, val in v}
            if tag == "$l":
                return [dec(e) for e in v]
            if tag == "$u":
                return tuple(dec(e) for e in v)
            if tag == "$f":
                return float(v)
            raise KeyError(tag)
        return x

    return dec(json.loads(skeleton))


class Checkpoints:
    """Atomic checkpoints ``DIR/checkpoints/<stage>-<step>.safetensors``; keeps the newest few."""

    PATTERN = re.compile(r"^(\d+)-([a-z_]+)-(\d{8})\.safetensors$")

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        self.directory = os.path.join(os.fspath(directory), "checkpoints")
        self.keep = keep

    def clear(self) -> None:
        """Remove the checkpoints of an earlier run (a fresh run must not resume from them)."""
        for *_, name in self._listing():
            os.remove(os.path.join(self.directory, name))

    def _listing(self) -> list[tuple[int, int, str]]:
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = self.PATTERN.match(name)
            if m:
                found.append((int(m.group(1)), int(m.group(3)), name))
        return sorted(found)

    def save(self, stage_index: int, stage: str, step: int, state: dict[str, Any]) -> str:
        tensors, skeleton = pack_state(state)
        path = os.path.join(self.directory, f"{stage_index}-{stage}-{step:08d}.safetensors")
        save_safetensors(tensors, path, {"format": CHECKPOINT_FORMAT, "state": skeleton})
        for *_, name in self._listing()[: -self.keep]:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.directory, name))
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, or None when there is none."""
        listing = self._listing()
        if not listing:
            return None
        path = os.path.join(self.directory, listing[-1][2])
        meta, tensors = read_safetensors(path)
        if meta.get("format") != CHECKPOINT_FORMAT or "state" not in meta:
            raise FileFormatError(f"{path}: not a d2nwg checkpoint ({CHECKPOINT_FORMAT})")
        try:
            return unpack_state(tensors, meta["state"])
        except (KeyError, ValueError, TypeError) as exc:
            raise FileFormatError(f"{path}: malformed checkpoint state ({exc})") from exc


class LossLog:
    """JSON lines ``{"stage", "step", ...}`` in ``DIR/log.jsonl`` (rank 0 only)."""

    def __init__(self, directory: str | os.PathLike | None, enabled: bool) -> None:
        self.path = os.path.join(os.fspath(directory), "log.jsonl") if directory else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            os.makedirs(os.fspath(directory), exist_ok=True)

    def clear(self) -> None:
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop lines a resumed run will write again (those after its checkpoint)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in rows if not (r["stage"] == stage and r["step"] > step)]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if self.path is None or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------
# torch.distributed.
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """This process's rank and the world size (1, 0 without torch.distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Join the process group that ``torchrun`` describes (env:// rendezvous): gloo on CPU,
        NCCL on CUDA. Without ``WORLD_SIZE`` > 1 this is a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, init_method="env://")
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (identity for one process)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.active:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
