"""Conditions: what a task's raw condition may be, and batches of them padded with a mask.

A ``"dataset"`` condition is ``[classes, shots, F]`` example inputs (or features), a
``"text"`` condition an ``[L, E]`` embedding; :func:`parse_conditions` takes one task's, a
batch ``[B, ...]`` or a list, and :class:`RawConditions` pads tasks of different sizes into one
masked batch that the condition encoder reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from d2nwg.errors import ConfigError, ShapeError, shape_of
from d2nwg.generator.config import CONDITION_RANKS, CONDITION_SHAPES


@dataclass
class RawConditions:
    """A batch of raw conditions ``x [B, ..., F]`` and ``mask x.shape[:-1]`` (True = real):
    dataset examples ``[B, classes, shots, F]`` or text embeddings ``[B, L, E]``."""

    x: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, index: torch.Tensor) -> RawConditions:
        return RawConditions(self.x[index], self.mask[index])

    def to(self, device: torch.device) -> RawConditions:
        return RawConditions(self.x.to(device), self.mask.to(device))

    @classmethod
    def stack(cls, conditions: Sequence[torch.Tensor], rank: int, features: int) -> RawConditions:
        """Pad conditions of rank ``rank`` (varying leading sizes) into one masked batch."""
        for i, c in enumerate(conditions):
            if (
                not isinstance(c, torch.Tensor)
                or c.dim() != rank
                or c.shape[-1] != features
                or not c.is_floating_point()
            ):
                raise ShapeError(
                    f"condition {i} must be a floating tensor {CONDITION_SHAPES[rank]} with "
                    f"F = {features}, got {shape_of(c)}"
                )
        lead = [max(c.shape[d] for c in conditions) for d in range(rank - 1)]
        x = conditions[0].new_zeros(len(conditions), *lead, features, dtype=torch.float32)
        mask = torch.zeros(len(conditions), *lead, dtype=torch.bool)
        for i, c in enumerate(conditions):
            region = (i,) + tuple(slice(0, s) for s in c.shape[:-1])
            x[region] = c.float()
            mask[region] = True
        return cls(x, mask)


def condition_rank(kind: str, condition: torch.Tensor | None) -> int:
    """The rank of one task's raw condition for a ``kind`` generator (3 dataset, 2 text, 0
    none), checked against a zoo item's ``condition``."""
    if kind == "none":
        if condition is not None:
            raise ConfigError("the zoo's items have conditions but D2NWGConfig.condition='none'")
        return 0
    rank = CONDITION_RANKS[kind]
    if condition is None or condition.dim() != rank:
        raise ConfigError(
            f"D2NWGConfig.condition={kind!r} needs zoo conditions {CONDITION_SHAPES[rank]}, "
            f"got {shape_of(condition) if condition is not None else None}"
        )
    return rank


def parse_conditions(
    condition, kind: str, rank: int, features: int
) -> tuple[RawConditions | None, int]:
    """One task's condition or a batch of them -> (RawConditions, number of tasks)."""
    if kind == "none":
        if condition is not None:
            raise ConfigError("this generator is unconditional: pass condition=None")
        return None, 1
    if condition is None:
        raise ConfigError(f"this generator is conditioned on {kind!r}: pass a condition")
    if isinstance(condition, torch.Tensor) and condition.dim() == rank:
        condition = [condition]
    elif isinstance(condition, torch.Tensor) and condition.dim() == rank + 1:
        condition = list(condition)
    if not isinstance(condition, (list, tuple)) or not condition:
        raise ShapeError(
            f"condition must be a tensor {CONDITION_SHAPES[rank]}, a batch of them, or a list; "
            f"got {shape_of(condition)}"
        )
    for i, x in enumerate(condition):
        if (
            isinstance(x, torch.Tensor)
            and x.is_floating_point()
            and not bool(torch.isfinite(x).all())
        ):
            raise ShapeError(f"condition {i} holds NaN or Inf")
    return RawConditions.stack(condition, rank, features), len(condition)
