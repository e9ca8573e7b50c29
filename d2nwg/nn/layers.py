"""Building blocks shared by d2nwg's networks: attention through ``latent_attention``,
MLPs, sinusoidal embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2nwg.errors import ConfigError, ShapeError, shape_of
from d2nwg.nn.io import seeded
from d2nwg.ops.latent_attention_op import latent_attention


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Fixed sin/cos embedding ``[..., dim]`` of the values ``x [...]`` (computed in fp32)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half
    )
    args = x.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ConfiguredModule(nn.Module):
    """A network made from a config: ``self.config`` is ``config`` (``config_class()`` when None)
    and :meth:`build` creates the layers, under ``seeded(seed)``."""

    config_class: type

    def __init__(self, config=None, seed: int | None = None):
        super().__init__()
        self.config = config or self.config_class()
        with seeded(seed):
            self.build(self.config)

    def build(self, c) -> None:
        raise NotImplementedError


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention (self, or cross to ``context`` of width ``context_dim``).

    ``mask [B, Lk]`` (True = attend) pads keys; the attention itself is
    :func:`d2nwg.ops.latent_attention` with ``backend`` (None = dispatch).
    """

    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = False
    ):
        super().__init__()
        for name, v in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Attention: {name} must be an int >= 1, got {v!r}")
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim)
        self.backend: str | None = None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        W = self.num_heads * self.head_dim
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != W:
            raise ShapeError(f"x must be [B, L, {W}], got {shape_of(x)}")
        B, L, _ = x.shape
        H, D = self.num_heads, self.head_dim
        if self.cross:
            width = self.kv.in_features
            if (
                not isinstance(context, torch.Tensor)
                or context.dim() != 3
                or context.shape[0] != B
                or context.shape[-1] != width
            ):
                raise ShapeError(f"context must be [{B}, Lc, {width}], got {shape_of(context)}")
        elif context is not None:
            raise ConfigError("a self-attention layer takes no context")
        if self.cross:
            q = self.q(x).view(B, L, H, D).transpose(1, 2)
            kv = self.kv(context).view(B, context.shape[1], 2, H, D)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        else:
            qkv = self.qkv(x).view(B, L, 3, H, D)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        if not isinstance(self.q_norm, nn.Identity):  # in fp32, back to the attention dtype
            q = self.q_norm(q.float()).to(v.dtype)
            k = self.k_norm(k.float()).to(v.dtype)
        o = latent_attention(q, k, v, mask, backend=self.backend)
        return self.out(o.transpose(1, 2).reshape(B, L, W))


class MAB(nn.Module):
    """Pre-norm multihead attention block of the Set Transformer: ``x`` attends to ``y``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, context_dim=dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        h = x + self.attn(self.norm_q(x), self.norm_kv(y), mask)
        return h + self.mlp(self.norm_mlp(h))


class ISAB(nn.Module):
    """Induced set attention block: ``m`` inducing points summarize the set, then broadcast."""

    def __init__(self, dim: int, num_heads: int, num_inducing: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(num_inducing, dim) * 0.02)
        self.mab1 = MAB(dim, num_heads, mlp_ratio)
        self.mab2 = MAB(dim, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        i = self.inducing.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.mab2(x, self.mab1(i, x, mask))


class PMA(nn.Module):
    """Pooling by multihead attention: ``k`` learned seeds attend to the (masked) set."""

    def __init__(self, dim: int, num_heads: int, num_seeds: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(num_seeds, dim) * 0.02)
        self.mab = MAB(dim, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(self.seeds.to(x.dtype).expand(x.shape[0], -1, -1), x, mask)


def set_attention_backend(module: nn.Module, backend: str | None) -> None:
    """Force (or with None, un-force) the attention backend of every Attention in ``module``."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.backend = backend
