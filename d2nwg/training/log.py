"""The training log: one JSON line per logged step, ``{"stage", "step", "loss", ...}``."""

from __future__ import annotations

import json
import os
from typing import Any


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
