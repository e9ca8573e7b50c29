"""Checkpoints that restore a run exactly, in safetensors (no pickle).

A checkpoint holds every module, the optimizer, the EMA, the step and the state of every random
generator of every rank, as a flat tensor dict plus a JSON skeleton (:func:`pack_state`). Each
is written to a temporary name and renamed, so a process killed while writing one leaves the
previous checkpoint as the newest whole one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from typing import Any

import torch

from d2nwg.errors import ConfigError, FileFormatError
from d2nwg.files import read_safetensors, save_safetensors

CHECKPOINT_FORMAT = "d2nwg.checkpoint/1"
TMP_PREFIX = ".tmp-"  # the temporary names of d2nwg.files.save_safetensors


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
        self.remove_partial()

    def remove_partial(self) -> None:
        """Remove what a process killed while writing left behind (never loaded: only whole
        files are renamed to checkpoint names)."""
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith(TMP_PREFIX):
                    with contextlib.suppress(OSError):
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

    def latest_path(self) -> str | None:
        """The checkpoint a resume starts from: the latest stage's highest step, or None."""
        listing = self._listing()
        return os.path.join(self.directory, listing[-1][2]) if listing else None

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, or None when there is none."""
        path = self.latest_path()
        if path is None:
            return None
        meta, tensors = read_safetensors(path)
        if meta.get("format") != CHECKPOINT_FORMAT or "state" not in meta:
            raise FileFormatError(f"{path}: not a d2nwg checkpoint ({CHECKPOINT_FORMAT})")
        try:
            return unpack_state(tensors, meta["state"])
        except (KeyError, ValueError, TypeError) as exc:
            raise FileFormatError(f"{path}: malformed checkpoint state ({exc})") from exc
