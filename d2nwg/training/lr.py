"""The learning-rate schedule of both training stages."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """The factor on the base learning rate at 0-based ``step`` of ``total``: linear warm-up
    to 1 over ``warmup`` steps, ``(step + 1) / warmup``, then a cosine decay to ``final`` at
    ``total``, ``final + (1 - final) (1 + cos(pi p)) / 2`` with ``p = (step - warmup) /
    (total - warmup)``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
