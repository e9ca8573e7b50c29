"""What the weights are for: condition encoders producing a :class:`Condition`.

A :class:`Condition` is ``tokens [B, K, E]`` (cross-attended by the denoiser), ``pooled [B, E]``
(added to the timestep embedding that drives adaLN), and an optional ``mask [B, K]``
(True = real token). Encoders:

* :class:`DatasetEncoder`: a set transformer over per-class example features
  ``[B, classes, shots, F]``: ISAB blocks and PMA pooling within each class (over shots), then
  self-attention across classes with no positional information, so token i always belongs
  to class i: permuting the classes permutes the tokens the same way (the pooled vector is
  invariant). The denoiser can tie slot i to output unit i with its ``max_cond_slots``
  slot embedding.
* :class:`TextConditioner`: precomputed text embeddings ``[B, L, E_in]`` (no model download).
* :class:`NullConditioner`: a learned null condition (unconditional branch of classifier-free
  guidance); :func:`drop_condition` swaps it in with probability p during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from d2nwg.errors import ConfigError, DeviceError, DTypeError, ShapeError, shape_of
from d2nwg.nn.io import JSONConfig, seeded
from d2nwg.nn.layers import ISAB, MAB, MLP, PMA, ConfiguredModule


# ----------------------------------------------------------------------------------------
# The condition container.
# ----------------------------------------------------------------------------------------
@dataclass
class Condition:
    """Condition tokens ``[B, K, E]``, pooled vector ``[B, E]``, optional mask ``[B, K]``."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        t, p, m = self.tokens, self.pooled, self.mask
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ShapeError(f"condition tokens must be a [B, K, E] tensor, got {shape_of(t)}")
        if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[0] != t.shape[0]:
            raise ShapeError(
                f"condition pooled must be [B, E] = [{t.shape[0]}, E], got {shape_of(p)}"
            )
        if not t.is_floating_point() or not p.is_floating_point():
            raise DTypeError(
                f"condition tokens/pooled must be floating point, got {t.dtype} and {p.dtype}"
            )
        if p.device != t.device:
            raise DeviceError(f"condition pooled is on {p.device}, tokens on {t.device}")
        if m is not None:
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise DTypeError(
                    f"condition mask must be a bool tensor, got "
                    f"{getattr(m, 'dtype', type(m).__name__)}"
                )
            if tuple(m.shape) != tuple(t.shape[:2]):
                raise ShapeError(
                    f"condition mask has shape {tuple(m.shape)}, expected [B, K] = "
                    f"{list(t.shape[:2])}"
                )
            if m.device != t.device:
                raise DeviceError(f"condition mask is on {m.device}, tokens on {t.device}")

    @classmethod
    def coerce(cls, cond) -> Condition | None:
        """A Condition from a Condition, a tuple ``(tokens, pooled[, mask])``, a packed tensor
        (see :meth:`pack`), or None."""
        if cond is None or isinstance(cond, Condition):
            return cond
        if isinstance(cond, torch.Tensor):
            return cls.unpack(cond)
        if isinstance(cond, (tuple, list)) and len(cond) in (2, 3):
            return cls(*cond)
        if all(hasattr(cond, a) for a in ("tokens", "pooled")):
            return cls(cond.tokens, cond.pooled, getattr(cond, "mask", None))
        raise DTypeError(
            f"cond must be a Condition, a (tokens, pooled[, mask]) tuple, a packed "
            f"tensor or None, "
            f"got {type(cond).__name__}"
        )

    def pack(self, num_tokens: int | None = None) -> torch.Tensor:
        """One tensor ``[B, 1 + K, E + 1]`` holding everything (for APIs that take a tensor
        condition, e.g. ``d2nwg.sample``'s cond/uncond under classifier-free guidance).

        Row 0 is ``[pooled, 1]``, rows 1.. are ``[token_k, mask_k]``; ``num_tokens`` pads K
        (padding masked out) so that a condition and a null condition pack to the same shape.
        """
        B, K, E = self.tokens.shape
        n = K if num_tokens is None else num_tokens
        if n < K:
            raise ShapeError(f"num_tokens={n} is smaller than the condition's {K} tokens")
        out = self.tokens.new_zeros(B, 1 + n, E + 1)
        out[:, 0, :E] = self.pooled.to(out.dtype)
        out[:, 0, E] = 1
        out[:, 1 : 1 + K, :E] = self.tokens
        out[:, 1 : 1 + K, E] = self.full_mask().to(out.dtype)
        return out

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> Condition:
        """The inverse of :meth:`pack`."""
        if packed.dim() != 3 or packed.shape[1] < 1 or packed.shape[2] < 2:
            raise ShapeError(
                f"a packed condition must be [B, 1 + K, E + 1], got {tuple(packed.shape)}"
            )
        if not packed.is_floating_point():
            raise DTypeError(f"a packed condition must be floating point, got {packed.dtype}")
        return cls(packed[:, 1:, :-1], packed[:, 0, :-1], packed[:, 1:, -1] > 0.5)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def to(self, *args, **kwargs) -> Condition:
        """Like ``Tensor.to`` (a dtype applies to tokens and pooled, never to the mask)."""
        mask = None
        if self.mask is not None:
            mask = self.mask.to(device=self.tokens.to(*args, **kwargs).device)
        return Condition(self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs), mask)

    def index_select(self, index: torch.Tensor) -> Condition:
        mask = None if self.mask is None else self.mask[index]
        return Condition(self.tokens[index], self.pooled[index], mask)

    def repeat_interleave(self, repeats: int) -> Condition:
        """Each condition ``repeats`` times in a row (e.g. num_samples per condition)."""
        mask = None if self.mask is None else self.mask.repeat_interleave(repeats, 0)
        return Condition(
            self.tokens.repeat_interleave(repeats, 0),
            self.pooled.repeat_interleave(repeats, 0),
            mask,
        )

    def full_mask(self) -> torch.Tensor:
        if self.mask is not None:
            return self.mask
        return torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)

    @staticmethod
    def cat(conds: Sequence[Condition]) -> Condition:
        """Concatenate along the batch, padding K to the longest (padding masked out)."""
        if not conds:
            raise ShapeError("Condition.cat needs at least one condition")
        K = max(c.tokens.shape[1] for c in conds)
        toks, masks = [], []
        for c in conds:
            pad = K - c.tokens.shape[1]
            toks.append(nn.functional.pad(c.tokens, (0, 0, 0, pad)))
            masks.append(nn.functional.pad(c.full_mask(), (0, pad), value=False))
        return Condition(torch.cat(toks), torch.cat([c.pooled for c in conds]), torch.cat(masks))


# ----------------------------------------------------------------------------------------
# Null condition and condition dropout (classifier-free guidance).
# ----------------------------------------------------------------------------------------
class NullConditioner(nn.Module):
    """A learned null condition: ``num_tokens`` tokens and a pooled vector of width ``dim``.

    ``null(batch_size)`` returns it broadcast to a batch; it is the unconditional input of
    classifier-free guidance and what :func:`drop_condition` swaps in during training.
    """

    def __init__(self, dim: int, num_tokens: int = 1, seed: int | None = None):
        super().__init__()
        if dim < 1 or num_tokens < 1:
            raise ConfigError(
                f"NullConditioner needs dim >= 1 and num_tokens >= 1, got {dim}, {num_tokens}"
            )
        with seeded(seed):
            self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
            self.pooled = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, batch_size: int, device: torch.device | None = None) -> Condition:
        t = self.tokens if device is None else self.tokens.to(device)
        p = self.pooled if device is None else self.pooled.to(device)
        mask = torch.ones(batch_size, t.shape[0], dtype=torch.bool, device=t.device)
        return Condition(t.expand(batch_size, -1, -1), p.expand(batch_size, -1), mask)


def drop_condition(
    cond: Condition,
    p: float,
    generator: torch.Generator | None = None,
    null: NullConditioner | Condition | None = None,
) -> Condition:
    """Condition dropout: each sample's condition becomes the null condition with probability p.

    A dropped sample sees exactly what the unconditional branch of guidance sees at sampling
    time (``model.null_condition``): the null tokens in slots ``0 .. K_null - 1`` (the rest
    masked out) and the null pooled vector, so slot embeddings and masks agree between
    training and sampling. The result has ``max(K, K_null)`` tokens. With ``null=None`` a
    dropped sample has no condition tokens (cross-attention contributes zeros) and a zero
    pooled vector. ``generator`` (a CPU generator) draws the coins.
    """
    cond = Condition.coerce(cond)
    if not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"condition dropout probability p={p} is not in [0, 1]")
    B, K, E = cond.tokens.shape
    device = cond.tokens.device
    drop = (torch.rand(B, generator=generator) < p).to(device)
    if null is None:
        pooled = torch.where(drop[:, None], torch.zeros_like(cond.pooled), cond.pooled)
        return Condition(cond.tokens, pooled, cond.full_mask() & ~drop[:, None])
    if isinstance(null, NullConditioner):
        null = null(B, device=device)
    if null.dim != E or null.batch_size not in (1, B):
        raise ShapeError(
            f"null condition has batch {null.batch_size} and width {null.dim}; "
            f"expected batch 1 or {B} and width {E}"
        )
    width = max(K, null.tokens.shape[1])
    cond, null = _pad_tokens(cond, width), _pad_tokens(null, width)
    tokens = torch.where(drop[:, None, None], null.tokens.to(cond.tokens.dtype), cond.tokens)
    mask = torch.where(drop[:, None], null.mask, cond.mask)
    pooled = torch.where(drop[:, None], null.pooled.to(cond.pooled.dtype), cond.pooled)
    return Condition(tokens, pooled, mask)


def _pad_tokens(cond: Condition, width: int) -> Condition:
    """``cond`` with its tokens padded (masked out) to ``width``."""
    pad = width - cond.tokens.shape[1]
    return Condition(
        nn.functional.pad(cond.tokens, (0, 0, 0, pad)),
        cond.pooled,
        nn.functional.pad(cond.full_mask(), (0, pad), value=False),
    )


# ----------------------------------------------------------------------------------------
# Dataset encoder (set transformer).
# ----------------------------------------------------------------------------------------
@dataclass
class DatasetEncoderConfig(JSONConfig):
    in_features: int = 512  # F: per-example feature width
    dim: int = 256  # E: condition width
    num_heads: int = 4
    num_inducing: int = 16  # ISAB inducing points
    shot_layers: int = 2  # ISAB blocks within a class (over shots)
    class_layers: int = 2  # attention blocks across classes
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("in_features", "dim", "num_heads", "num_inducing"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"DatasetEncoderConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.dim % self.num_heads:
            raise ConfigError(
                f"DatasetEncoderConfig.dim={self.dim} is not divisible by "
                f"num_heads={self.num_heads}"
            )


class DatasetEncoder(ConfiguredModule):
    """Set transformer over ``x [B, classes, shots, F]`` -> Condition(tokens [B, classes, E]).

    ``shot_mask [B, classes, shots]`` marks real examples, ``class_mask [B, classes]`` real
    classes (a class without a real shot counts as absent). Token i is class i's embedding:
    the encoder is permutation-equivariant over classes and invariant over shots.
    """

    config_class = DatasetEncoderConfig

    def build(self, c: DatasetEncoderConfig) -> None:
        self.in_proj = nn.Linear(c.in_features, c.dim)
        self.shot_blocks = nn.ModuleList(
            ISAB(c.dim, c.num_heads, c.num_inducing, c.mlp_ratio) for _ in range(c.shot_layers)
        )
        self.class_pool = PMA(c.dim, c.num_heads, 1, c.mlp_ratio)
        self.class_blocks = nn.ModuleList(
            MAB(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.class_layers)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.pool = PMA(c.dim, c.num_heads, 1, c.mlp_ratio)
        self.pool_proj = nn.Linear(c.dim, c.dim)

    def forward(
        self,
        x: torch.Tensor,
        shot_mask: torch.Tensor | None = None,
        class_mask: torch.Tensor | None = None,
    ) -> Condition:
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != c.in_features:
            raise ShapeError(f"x must be [B, classes, shots, {c.in_features}], got {shape_of(x)}")
        if not x.is_floating_point():
            raise DTypeError(f"x must be floating point, got {x.dtype}")
        B, N, S, _ = x.shape
        if N == 0 or S == 0:
            raise ShapeError(
                f"x must hold at least one class and one shot per class, got "
                f"{N} classes of {S} shots ({tuple(x.shape)})"
            )
        for name, m, shape in (
            ("shot_mask", shot_mask, (B, N, S)),
            ("class_mask", class_mask, (B, N)),
        ):
            if m is not None and not isinstance(m, torch.Tensor):
                raise DTypeError(f"{name} must be a bool tensor or None, got {type(m).__name__}")
            if m is not None and (m.dtype != torch.bool or tuple(m.shape) != shape):
                raise ShapeError(
                    f"{name} must be a bool tensor of shape {list(shape)}, got "
                    f"{m.dtype} {tuple(m.shape)}"
                )
            if m is not None and m.device != x.device:
                raise DeviceError(f"{name} is on {m.device}, x on {x.device}")
        if shot_mask is not None:
            has_shot = shot_mask.any(-1)
            class_mask = has_shot if class_mask is None else class_mask & has_shot
        flat_mask = None if shot_mask is None else shot_mask.reshape(B * N, S)
        h = self.in_proj(x.reshape(B * N, S, -1))
        for blk in self.shot_blocks:
            h = blk(h, flat_mask)
        tok = self.class_pool(h, flat_mask).reshape(B, N, -1)
        for blk in self.class_blocks:
            tok = blk(tok, tok, class_mask)
        tok = self.norm(tok)
        pooled = self.pool_proj(self.pool(tok, class_mask)[:, 0])
        return Condition(tok, pooled, class_mask)


# ----------------------------------------------------------------------------------------
# Text conditioner (precomputed embeddings).
# ----------------------------------------------------------------------------------------
@dataclass
class TextConditionerConfig(JSONConfig):
    in_dim: int = 768  # width of the precomputed text embeddings
    dim: int = 256  # condition width

    def __post_init__(self) -> None:
        if self.in_dim < 1 or self.dim < 1:
            raise ConfigError(
                f"TextConditionerConfig needs in_dim, dim >= 1, got {self.in_dim}, {self.dim}"
            )


class TextConditioner(ConfiguredModule):
    """Precomputed text embeddings ``[B, L, in_dim]`` (+ mask ``[B, L]``) -> Condition."""

    config_class = TextConditionerConfig

    def build(self, c: TextConditionerConfig) -> None:
        self.norm = nn.LayerNorm(c.in_dim)
        self.proj = MLP(c.in_dim, c.dim, c.dim)
        self.pool_proj = MLP(c.dim, c.dim)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> Condition:
        c = self.config
        if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or emb.shape[-1] != c.in_dim:
            raise ShapeError(f"text embeddings must be [B, L, {c.in_dim}], got {shape_of(emb)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != emb.shape[:2]):
            raise ShapeError(
                f"mask must be a bool tensor of shape {list(emb.shape[:2])}, got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        tok = self.proj(self.norm(emb))
        if mask is None:
            mean = tok.mean(1)
        else:
            w = mask.to(tok.dtype)[..., None]
            mean = (tok * w).sum(1) / w.sum(1).clamp_min(1.0)
        return Condition(tok, self.pool_proj(mean), mask)
