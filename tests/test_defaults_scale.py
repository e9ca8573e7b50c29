"""The sizes ``D2NWGConfig.resolve`` derives for zoos of whole networks (issue 17): what a user
who calls ``fit`` with the defaults gets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2nwg import D2NWGConfig
from d2nwg.generator.config import LATENT_MAX, resolve_for


def whole_mlp() -> dict[str, torch.Tensor]:
    """The issue's whole network: 64 -> 32 -> 32 -> 5 (3,301 weights), as meta tensors."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                            nn.Linear(32, 5))  # fmt: skip
    return net.state_dict()


def test_small_chunks_are_not_compressed():
    """A whole MLP of 3,301 weights: 64-value chunks, 54 tokens, each latent as wide as its
    chunk (a C/4 latent lost 3.4% of the zoo's accuracy in a VAE round trip)."""
    cfg, tok, windows = resolve_for(D2NWGConfig(), whole_mlp(), cond_features=32)
    assert (tok.num_params, cfg.chunk_size, tok.num_tokens) == (3301, 64, 54)
    assert cfg.latent_dim == cfg.chunk_size == LATENT_MAX
    assert windows.num_windows == 1


@pytest.mark.parametrize(
    ("num_params", "chunk_size", "latent_dim"),
    [(325, 64, 64), (8192, 128, 64), (16384, 256, 64), (3_000_000, 4096, 64)],
)
def test_latent_width_caps_at_latent_max(num_params, chunk_size, latent_dim):
    """C up to LATENT_MAX values per latent, compressed beyond (256-value chunks 4x, as the
    LoRA demo's one-token-per-factor chunks always were)."""
    cfg = D2NWGConfig().resolve(num_params=num_params, cond_features=8)
    assert (cfg.chunk_size, cfg.latent_dim) == (chunk_size, latent_dim)


def test_an_explicit_latent_width_is_kept():
    cfg = D2NWGConfig(latent_dim=16).resolve(num_params=3301, cond_features=32)
    assert cfg.latent_dim == 16
