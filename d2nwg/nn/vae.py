"""ChunkVAE: each weight chunk token ``[C]`` <-> one latent token ``[d]``.

An MLP encoder maps a chunk to a diagonal Gaussian ``N(mu, exp(logvar))`` over ``d`` latent
dimensions, an MLP decoder maps a latent back to the chunk. Every chunk is processed
independently (one big batched matmul over all tokens), so any ``[..., C]`` batch works.

Training (``loss``): reconstruction MSE over real entries only (the tokenizer's mask
``[T, C]`` or ``[N, T, C]``; padding is ignored), plus ``kl_weight`` times the KL divergence to
N(0, I) averaged over tokens that hold any real entry. In training mode, small Gaussian noise
is added to the (real) inputs (``input_noise``) and to the sampled latents (``latent_noise``),
which makes decoded weights robust to the denoiser's errors. The noise is drawn from
``generator`` when given (deterministic training).

``decode(z, max_batch=...)`` decodes any number of latents in slices of at most ``max_batch``
tokens into one preallocated output, so peak memory is bounded by the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from d2nwg.errors import ConfigError, DeviceError, DTypeError, ShapeError, shape_of
from d2nwg.nn.io import JSONConfig
from d2nwg.nn.layers import ConfiguredModule

MIN_CHUNK, MAX_CHUNK = 64, 16384


@dataclass
class ChunkVAEConfig(JSONConfig):
    chunk_size: int = 256  # C
    compression: int = 8  # latent_dim = chunk_size // compression when latent_dim is 0
    latent_dim: int = 0  # d (0: derived from compression)
    hidden_dim: int = 0  # MLP width (0: clamp(chunk_size // 2, 256, 1024))
    num_blocks: int = 2  # residual MLP blocks in the encoder and in the decoder
    kl_weight: float = 1e-4
    input_noise: float = 1e-3  # std of the training noise added to input chunks
    latent_noise: float = 1e-1  # std of the training noise added to sampled latents
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(
                f"ChunkVAEConfig.chunk_size={self.chunk_size} is not in [{MIN_CHUNK}, {MAX_CHUNK}]"
            )
        if self.latent_dim == 0:
            if self.compression < 1:
                raise ConfigError(
                    f"ChunkVAEConfig.compression must be >= 1, got {self.compression}"
                )
            self.latent_dim = max(1, self.chunk_size // self.compression)
        if self.hidden_dim == 0:
            self.hidden_dim = min(1024, max(256, self.chunk_size // 2))
        if self.latent_dim < 1 or self.hidden_dim < 1 or self.num_blocks < 0:
            raise ConfigError(
                f"ChunkVAEConfig: latent_dim={self.latent_dim}, hidden_dim="
                f"{self.hidden_dim}, num_blocks={self.num_blocks} out of range"
            )
        for name in ("kl_weight", "input_noise", "latent_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ChunkVAEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.logvar_min < self.logvar_max:
            raise ConfigError(
                f"ChunkVAEConfig: logvar_min={self.logvar_min} must be below "
                f"logvar_max={self.logvar_max}"
            )

    @property
    def ratio(self) -> float:
        """The achieved compression ratio C / d."""
        return self.chunk_size / self.latent_dim


class _ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


def _mlp(d_in: int, hidden: int, d_out: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        *(_ResBlock(hidden) for _ in range(blocks)),
        nn.LayerNorm(hidden),
        nn.SiLU(),
        nn.Linear(hidden, d_out),
    )


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(
        x.shape, generator=generator, device=generator.device, dtype=torch.float32
    ).to(device=x.device, dtype=x.dtype)


class ChunkVAE(ConfiguredModule):
    """Variational auto-encoder of weight chunks ``[..., C]`` into latent tokens ``[..., d]``."""

    config_class = ChunkVAEConfig

    def build(self, c: ChunkVAEConfig) -> None:
        self.encoder = _mlp(c.chunk_size, c.hidden_dim, 2 * c.latent_dim, c.num_blocks)
        self.decoder = _mlp(c.latent_dim, c.hidden_dim, c.chunk_size, c.num_blocks)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def _check(self, x: torch.Tensor, width: int, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != width:
            raise ShapeError(f"{name} must be [..., {width}], got {shape_of(x)}")
        if not x.is_floating_point():
            raise DTypeError(f"{name} must be floating point, got {x.dtype}")

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """A bool mask of x's trailing dims ([T, C] or [N, T, C]), expanded to x's shape."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise DTypeError(f"mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise DTypeError(f"mask must be bool (True = real entry), got {mask.dtype}")
        if mask.dim() > x.dim() or tuple(mask.shape) != tuple(x.shape[x.dim() - mask.dim() :]):
            raise ShapeError(
                f"mask has shape {tuple(mask.shape)}; expected the trailing "
                f"dims of chunks {tuple(x.shape)}"
            )
        if mask.device != x.device:
            raise DeviceError(f"mask is on {mask.device}, the chunks on {x.device}")
        return mask.expand_as(x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks ``[..., C]`` -> ``(mu, logvar)``, each ``[..., d]``."""
        self._check(x, self.config.chunk_size, "chunks")
        h = self.encoder(x)
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(self.config.logvar_min, self.config.logvar_max)

    @torch.no_grad()
    def encode_mean(self, x: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """Latent means of chunks ``[..., C]`` (no grad), in slices of ``max_batch`` tokens."""
        self._check(x, self.config.chunk_size, "chunks")
        return self._sliced(lambda t: self.encode(t)[0], x, self.config.latent_dim, max_batch)

    def decode(self, z: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """Latents ``[..., d]`` -> chunks ``[..., C]``; at most ``max_batch`` tokens at a time."""
        self._check(z, self.config.latent_dim, "latents")
        return self._sliced(self.decoder, z, self.config.chunk_size, max_batch)

    @staticmethod
    def _sliced(fn, x: torch.Tensor, out_width: int, max_batch: int | None) -> torch.Tensor:
        if max_batch is not None and (
            isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
        ):
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if max_batch is None or n <= max_batch:
            return fn(flat).reshape(*lead, out_width)
        first = fn(flat[:max_batch])
        out = first.new_empty(n, out_width)
        out[:max_batch] = first
        for s in range(max_batch, n, max_batch):
            out[s : s + max_batch] = fn(flat[s : s + max_batch])
        return out.reshape(*lead, out_width)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction [..., C], mu, logvar)``; noisy and sampled in training mode."""
        c = self.config
        self._check(x, c.chunk_size, "chunks")
        mask = self._check_mask(mask, x)
        if self.training and c.input_noise > 0:
            noise = _randn_like(x, generator) * c.input_noise
            x = x + (noise if mask is None else noise * mask.to(noise.dtype))
        mu, logvar = self.encode(x)
        z = mu
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * _randn_like(mu, generator)
            if c.latent_noise > 0:
                z = z + _randn_like(z, generator) * c.latent_noise
        return self.decoder(z), mu, logvar

    def loss(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "recon", "kl"}`` for chunks ``x [N, T, C]`` (or ``[T, C]``), fp32.

        ``mask`` (bool, True = real entry) is ``[T, C]`` or ``[N, T, C]``; padded entries do not
        contribute to the reconstruction loss, all-padding tokens not to the KL term.
        """
        self._check(x, self.config.chunk_size, "chunks")
        mask = self._check_mask(mask, x)
        recon, mu, logvar = self(x, mask, generator)
        err = (recon.float() - x.float()).square()
        kl = 0.5 * (mu.float().square() + logvar.float().exp() - 1.0 - logvar.float()).mean(-1)
        if mask is None:
            rec = err.mean()
            kl = kl.mean()
        else:
            w = mask.to(torch.float32)
            rec = (err * w).sum() / w.sum().clamp_min(1.0)
            real_tok = mask.any(-1).to(torch.float32)
            kl = (kl * real_tok).sum() / real_tok.sum().clamp_min(1.0)
        return {"loss": rec + self.config.kl_weight * kl, "recon": rec, "kl": kl}
