"""Every seed the generator derives from ``D2NWGConfig.seed`` or a sampling seed, in one place,
so that training, sampling and their tests cannot drift apart."""

from __future__ import annotations

MIX = 1_000_003  # a prime: seed * MIX + small offsets never collide for small offsets
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / phi: spreads window indices over the seed space


def network_seed(seed: int, part: int) -> int:
    """The initialization seed of network ``part`` (0: ChunkVAE, 1: denoiser, 2: encoder)."""
    return seed + part


def stage_seed(seed: int, rank: int, stage_index: int) -> int:
    """The training generator of one rank in one stage (0: VAE, 1: diffusion)."""
    return seed * MIX + 7919 * rank + stage_index


def noise_seed(seed: int, sample: int, window: int) -> int:
    """The generator seed of one window of one sample (window 0: as before windows)."""
    return (int(seed) * MIX + sample + window * GOLDEN) % (2**63)
