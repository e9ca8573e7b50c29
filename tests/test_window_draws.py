"""Windowed training: which windows a step draws."""

from __future__ import annotations

import pytest
import torch

import d2nwg
from d2nwg.generator.stages import draw_windows
from d2nwg.windows import WindowLayout

SHAPES = {"fc1.weight": (24, 40), "fc1.bias": (96,), "norm.weight": (96,), "fc2.weight": (5, 96),
          "fc2.bias": (5,)}  # fmt: skip  (28 tokens of 64)


def tokenizer() -> d2nwg.WeightTokenizer:
    return d2nwg.WeightTokenizer.from_state_dict(
        {k: torch.zeros(s) for k, s in SHAPES.items()}, chunk_size=64
    )


def test_training_draws_cover_the_ends_as_often_as_the_middle():
    """Windows at every offset, drawn as training draws them: the first and last tokens lie
    in as many drawn windows as a middle token (uniform offsets would give them a W-th), and
    none in more than twice as many."""
    win = WindowLayout.from_tokenizer(tokenizer(), 6, 3).for_training()
    w = draw_windows(win, 200_000, torch.Generator().manual_seed(0))
    assert int(w.min()) == 0 and int(w.max()) == win.num_windows - 1
    covered = torch.zeros(28)
    covered.index_add_(0, win.index[w].flatten(), torch.ones(w.numel() * 6))
    share = covered / w.numel()
    # every token: W to 2W - 1 of the T + W - 1 starts (6 / 33 to 11 / 33)
    assert float(share.min()) >= 6 / 33 - 0.005 and float(share.max()) <= 11 / 33 + 0.005, share
    assert float(share[5]) == pytest.approx(11 / 33, abs=0.005)
    assert float(share[0]) == pytest.approx(float(share[14]), abs=0.01)
    assert float(share[-1]) == pytest.approx(float(share[14]), abs=0.01)
    aligned = WindowLayout.from_tokenizer(tokenizer(), 6, 0)
    counts = torch.bincount(draw_windows(aligned, 7000, torch.Generator().manual_seed(0)))
    assert counts.numel() == aligned.num_windows and int(counts.min()) > 700
