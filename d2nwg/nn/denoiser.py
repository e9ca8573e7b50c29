"""LatentDenoiser: a DiT-style transformer over the latent tokens of one model (or window).

``model(x_t [B, T, d], t [B], cond) -> prediction [B, T, d]``, where the prediction means
epsilon, v or x0 ("sample") according to ``config.prediction_type`` (the network is the same; the
sampler and the training loss read the field).

* Input: ``x_t`` projected to ``hidden_dim``, plus a fixed 2-D sinusoidal embedding of each
  token's position ``(layer index, chunk index)`` (half of the channels each), plus a learned
  embedding of the token's layer kind (``num_layer_kinds > 0``; e.g. conv / linear / norm / bias).
* Blocks (adaLN-Zero): ``c = t_emb(t) + pooled_emb(cond.pooled)`` produces shift / scale /
  gate for self-attention and for the MLP; between them a residual cross-attention to the
  condition tokens (``cond.mask`` pads them). Modulations, the cross-attention output and
  the final projection start at zero, so an untrained model predicts 0.
* Attention is :func:`d2nwg.ops.latent_attention` (Triton on CUDA); self-attention honours a
  token mask ``[B, T]`` (True = real token) so padding tokens never affect real ones.

Layout: ``positions [T, 2]`` (or ``[B, T, 2]``) and ``layer_kinds [T]`` (or ``[B, T]``) come
from :class:`d2nwg.WeightTokenizer` (``tok.positions``). Set them once with
:meth:`LatentDenoiser.set_layout` (kept as non-persistent buffers) or pass them to
``forward``, which takes precedence. Without either, positions are ``(0, token index)``
and every kind is 0.

Class rows (``class_rows=True``): the tokens of layers whose dim-0 rows belong to classes
(a classifier's output layer) get ``class_index [T]`` (or ``[B, T]``; -1 for other tokens,
from :meth:`d2nwg.WindowLayout.denoiser_layout`). Token i of class row k receives class k's
condition token, through its own MLP, added to its input; a class the condition lacks (a
masked slot, k >= K, or the null condition of guidance) gives the learned null token 0, so
the unconditional branch treats every row alike. There are no slot embeddings then: the
cross-attention sees the condition tokens as a set, so permuting the condition's classes
together with the class rows' inputs permutes those rows' outputs (to float rounding), and
every other token's output is unchanged; a token holding values of several classes (a
classifier's bias in one chunk) sees only order-free summaries of the condition.

Conditioning: ``cond`` is a :class:`Condition`, a ``(tokens, pooled[, mask])`` tuple, or None
(the model's learned null condition, ``model.null_condition(B)``, i.e. the unconditional
branch of classifier-free guidance). With ``cond_dim == 0`` the model is unconditional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from d2nwg.errors import ConfigError, DTypeError, ShapeError, shape_of
from d2nwg.nn.conditioners import Condition, NullConditioner
from d2nwg.nn.io import JSONConfig, seeded
from d2nwg.nn.layers import MLP, Attention, set_attention_backend, sinusoidal
from d2nwg.schedule import PREDICTION_TYPES, NoiseSchedule


@dataclass
class LatentDenoiserConfig(JSONConfig):
    latent_dim: int = 32  # d: width of a latent token (ChunkVAE latent_dim)
    hidden_dim: int = 384  # transformer width (divisible by 4 and by num_heads)
    depth: int = 8
    num_heads: int = 6
    mlp_ratio: float = 4.0
    cond_dim: int = 0  # E: condition width; 0 = unconditional
    cross_attention: bool = True  # cross-attend to condition tokens (when cond_dim > 0)
    num_null_tokens: int = 1  # tokens of the learned null condition
    max_cond_slots: int = 0  # >0: learned embedding of condition slot k (class k)
    class_rows: bool = False  # tokens with class_index k >= 0 get condition token k
    num_layer_kinds: int = 0  # >0: learned layer-kind embedding
    prediction_type: str = "epsilon"
    qk_norm: bool = True  # RMSNorm on queries and keys (bf16 stability)
    timestep_freq_dim: int = 256
    max_period: float = 10000.0  # of the timestep and position sinusoids

    def __post_init__(self) -> None:
        for name in ("latent_dim", "hidden_dim", "depth", "num_heads", "timestep_freq_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"LatentDenoiserConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.hidden_dim % 4 or self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"LatentDenoiserConfig.hidden_dim={self.hidden_dim} must be divisible "
                f"by 4 and by num_heads={self.num_heads}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"LatentDenoiserConfig.prediction_type={self.prediction_type!r}; "
                f"choose from {PREDICTION_TYPES} (the names d2nwg.sample uses)"
            )
        for name in ("cond_dim", "max_cond_slots", "num_layer_kinds"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"LatentDenoiserConfig.{name} must be >= 0, got {getattr(self, name)}"
                )
        if self.class_rows and (self.cond_dim == 0 or self.max_cond_slots):
            raise ConfigError(
                "LatentDenoiserConfig.class_rows needs a condition (cond_dim > 0) and no slot "
                f"embeddings (max_cond_slots=0, got {self.max_cond_slots}): a slot embedding "
                "tells class k from class j by position, which class rows are built to avoid"
            )


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, cond_dim: int | None, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.cross = None
        if cond_dim:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, heads, context_dim=cond_dim, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, mask=None, context=None, context_mask=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), sh1, sc1), mask=mask)
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class LatentDenoiser(nn.Module):
    """DiT-style denoiser of latent token sequences (see the module docstring)."""

    config_class = LatentDenoiserConfig

    def __init__(
        self,
        config: LatentDenoiserConfig | None = None,
        seed: int | None = None,
        positions: torch.Tensor | None = None,
        layer_kinds: torch.Tensor | None = None,
        class_index: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = c = config or LatentDenoiserConfig()
        W = c.hidden_dim
        cross_dim = c.cond_dim if (c.cond_dim and c.cross_attention) else None
        with seeded(seed):
            self.x_embed = nn.Linear(c.latent_dim, W)
            self.t_embed = MLP(c.timestep_freq_dim, W, W)
            self.kind_embed = nn.Embedding(c.num_layer_kinds, W) if c.num_layer_kinds else None
            if c.cond_dim:
                self.pooled_embed = MLP(c.cond_dim, W, W)
                self.null = NullConditioner(c.cond_dim, c.num_null_tokens)
                self.slot_embed = (
                    nn.Embedding(c.max_cond_slots, c.cond_dim)
                    if (c.max_cond_slots and cross_dim)
                    else None
                )
            else:
                self.pooled_embed = self.null = self.slot_embed = None
            # condition token k -> the input of the tokens of class row k
            self.class_embed = MLP(c.cond_dim, W, W) if c.class_rows else None
            self.blocks = nn.ModuleList(
                DiTBlock(W, c.num_heads, c.mlp_ratio, cross_dim, c.qk_norm) for _ in range(c.depth)
            )
            self.final_norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
            self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
            self.final = nn.Linear(W, c.latent_dim)
            self._init_weights()
        self.register_buffer("positions", None, persistent=False)
        self.register_buffer("layer_kinds", None, persistent=False)
        self.register_buffer("class_index", None, persistent=False)
        if positions is not None or layer_kinds is not None or class_index is not None:
            self.set_layout(positions, layer_kinds, class_index)
        self._attention_backend: str | None = None

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.t_embed.fc1.weight, std=0.02)
        nn.init.normal_(self.t_embed.fc2.weight, std=0.02)
        zero = [self.final_ada[1], self.final]
        for blk in self.blocks:
            zero.append(blk.ada[1])
            if blk.cross is not None:
                zero.append(blk.cross.out)
        for lin in zero:  # adaLN-Zero: every residual branch and the output start at 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # -- configuration ----------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def attention_backend(self) -> str | None:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: str | None) -> None:
        """Force an attention backend ("triton", "torch", "xformers") or None (dispatch)."""
        self._attention_backend = backend
        set_attention_backend(self, backend)

    def set_layout(
        self,
        positions: torch.Tensor | None,
        layer_kinds: torch.Tensor | None = None,
        class_index: torch.Tensor | None = None,
    ) -> None:
        """Store the token layout: positions ``[T, 2]`` (layer, chunk), layer kinds ``[T]``
        and class rows ``[T]`` (-1: none)."""
        if positions is not None:
            self._check_positions(positions, None, None)
            self.positions = positions.detach().to(torch.long)
        if layer_kinds is not None:
            self._check_kinds(layer_kinds, None, None)
            self.layer_kinds = layer_kinds.detach().to(torch.long)
        if class_index is not None:
            self._check_class_index(class_index, None, None)
            self.class_index = class_index.detach().to(torch.long)

    def null_condition(self, batch_size: int, device: torch.device | None = None) -> Condition:
        """The learned null condition (unconditional branch of classifier-free guidance)."""
        if self.null is None:
            raise ConfigError("this LatentDenoiser is unconditional (cond_dim=0)")
        return self.null(batch_size, device)

    # -- checks -----------------------------------------------------------------------------
    @staticmethod
    def _check_positions(p, B, T) -> None:
        if not isinstance(p, torch.Tensor) or p.dim() not in (2, 3) or p.shape[-1] != 2:
            raise ShapeError(f"positions must be [T, 2] or [B, T, 2], got {shape_of(p)}")
        if T is not None and (p.shape[-2] != T or (p.dim() == 3 and p.shape[0] != B)):
            raise ShapeError(
                f"positions have shape {tuple(p.shape)}, expected [{T}, 2] or [{B}, {T}, 2]"
            )

    @staticmethod
    def _check_token_ints(name: str, k, B, T) -> None:
        """``name`` holds one integer per token, ``[T]`` or ``[B, T]``."""
        if not isinstance(k, torch.Tensor) or k.dim() not in (1, 2):
            raise ShapeError(f"{name} must be [T] or [B, T], got {shape_of(k)}")
        if k.is_floating_point() or k.dtype == torch.bool:
            raise DTypeError(f"{name} must be integers, got {k.dtype}")
        if T is not None and (k.shape[-1] != T or (k.dim() == 2 and k.shape[0] != B)):
            raise ShapeError(f"{name} has shape {tuple(k.shape)}, expected [{T}] or [{B}, {T}]")

    def _check_kinds(self, k, B, T) -> None:
        self._check_token_ints("layer_kinds", k, B, T)
        n = self.config.num_layer_kinds
        # Range check on CPU, eager only: on CUDA it would synchronize (and break graph
        # capture), under torch.compile break the graph; there nn.Embedding's own (device)
        # assert catches an out-of-range kind.
        if (
            k.device.type == "cpu"
            and k.numel()
            and not torch.compiler.is_compiling()
            and (int(k.min()) < 0 or int(k.max()) >= max(n, 1))
        ):
            raise ShapeError(
                f"layer_kinds must lie in [0, {max(n, 1)}) (num_layer_kinds={n}), got "
                f"[{int(k.min())}, {int(k.max())}]"
            )

    def _check_class_index(self, k, B, T) -> None:
        if not self.config.class_rows:
            raise ConfigError(
                "class_index was given, but this LatentDenoiser has no class rows "
                "(LatentDenoiserConfig.class_rows=False)"
            )
        self._check_token_ints("class_index", k, B, T)
        if k.device.type == "cpu" and k.numel() and not torch.compiler.is_compiling():
            if int(k.min()) < -1:  # (eager CPU only, as for layer kinds)
                raise ShapeError(f"class_index must be >= -1 (-1: no class), got {int(k.min())}")

    def _class_inputs(self, class_index: torch.Tensor, cond: Condition, B: int) -> torch.Tensor:
        """``[B, T, W]``: for a token of class row k, ``class_embed`` of condition token k
        (of the learned null token 0 when slot k is masked out or absent); 0 elsewhere."""
        tokens = cond.tokens
        _, K, E = tokens.shape
        idx = class_index.to(tokens.device).expand(B, -1)
        absent = self.null.tokens[:1].to(tokens.dtype).expand(B, 1, E)
        table = torch.cat([tokens, absent], 1)  # [B, K + 1, E]: slot K is "no such class"
        present = (idx >= 0) & (idx < K)
        if K:
            present &= cond.full_mask().gather(1, idx.clamp(0, K - 1))
        rows = table.gather(1, torch.where(present, idx, K)[..., None].expand(-1, -1, E))
        return self.class_embed(rows) * (idx >= 0)[..., None].to(rows.dtype)

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond=None,
        *,
        positions: torch.Tensor | None = None,
        layer_kinds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        class_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict epsilon / v / x0 ``[B, T, d]`` from noisy latents ``x_t [B, T, d]`` at
        steps ``t [B]``.

        ``class_index [B, T]`` or ``[T]`` (long, -1: none; class-row denoisers only) says
        which class row each token writes; it takes precedence over :meth:`set_layout`'s.

        ``mask [B, T]`` or ``[T]`` (bool, True = real token) keeps padding tokens out of
        self-attention; their outputs are meaningless.
        """
        c = self.config
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 3 or x_t.shape[-1] != c.latent_dim:
            raise ShapeError(f"x_t must be [B, T, {c.latent_dim}], got {shape_of(x_t)}")
        if not x_t.is_floating_point():
            raise DTypeError(f"x_t must be floating point, got {x_t.dtype}")
        B, T, _ = x_t.shape
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ShapeError(f"t must be [B] = [{B}], got {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise DTypeError(f"t must be an integer (or float) tensor, got {t.dtype}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise DTypeError(f"mask must be bool (True = real token), got {mask.dtype}")
            if mask.dim() == 1:
                mask = mask.expand(B, -1)
            if tuple(mask.shape) != (B, T):
                raise ShapeError(
                    f"mask has shape {tuple(mask.shape)}, expected [{B}, {T}] or [{T}]"
                )

        positions = self.positions if positions is None else positions
        if positions is None:
            pos = torch.arange(T, device=x_t.device)
            positions = torch.stack([torch.zeros_like(pos), pos], dim=-1)
        self._check_positions(positions, B, T)
        half = c.hidden_dim // 2
        pos = positions.to(x_t.device)
        pos_emb = torch.cat(
            [
                sinusoidal(pos[..., 0], half, c.max_period),
                sinusoidal(pos[..., 1], half, c.max_period),
            ],
            dim=-1,
        )
        h = self.x_embed(x_t) + pos_emb.to(x_t.dtype)
        if self.kind_embed is not None:
            kinds = self.layer_kinds if layer_kinds is None else layer_kinds
            if kinds is not None:
                self._check_kinds(kinds, B, T)
                h = h + self.kind_embed(kinds.to(x_t.device))

        class_index = self.class_index if class_index is None else class_index
        if class_index is not None:
            self._check_class_index(class_index, B, T)

        emb = self.t_embed(sinusoidal(t, c.timestep_freq_dim, c.max_period).to(x_t.dtype))
        context = context_mask = None
        if self.null is not None:
            cond = Condition.coerce(cond)
            if cond is None:
                cond = self.null(B, device=x_t.device)
            if cond.batch_size != B or cond.dim != c.cond_dim:
                raise ShapeError(
                    f"cond has batch {cond.batch_size} and width {cond.dim}; "
                    f"expected batch {B} and cond_dim {c.cond_dim}"
                )
            emb = emb + self.pooled_embed(cond.pooled.to(x_t.dtype))
            context, context_mask = cond.tokens.to(x_t.dtype), cond.mask
            if self.slot_embed is not None:
                K = context.shape[1]
                if K > c.max_cond_slots:
                    raise ShapeError(f"cond has {K} tokens but max_cond_slots={c.max_cond_slots}")
                context = context + self.slot_embed.weight[:K].to(context.dtype)
            if class_index is not None:
                h = h + self._class_inputs(class_index, cond, B).to(h.dtype)
        elif cond is not None:
            raise ConfigError("this LatentDenoiser is unconditional (cond_dim=0); pass cond=None")

        for blk in self.blocks:
            h = blk(h, emb, mask, context, context_mask)
        shift, scale = self.final_ada(emb).chunk(2, dim=-1)
        return self.final(_modulate(self.final_norm(h), shift, scale))


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    t: torch.Tensor,
    noise: torch.Tensor,
    cond=None,
    *,
    prediction_type: str = "epsilon",
    mask: torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """The denoising loss (Ho et al. 2020, eq. 14, generalized to v and x0 targets), fp32.

    ``x_t = alpha_t x0 + sigma_t noise``; the model's output at ``(x_t, t, cond)`` is compared
    with :meth:`NoiseSchedule.target` for ``prediction_type`` by mean squared error over the
    latent width, averaged over real tokens (``mask [B, T]`` or ``[T]``, True = real; the mask
    is also passed to the model so padding never reaches real tokens).

    Shapes: ``x0``, ``noise`` ``[B, T, d]``; ``t`` ``[B]`` long.
    """
    if x0.shape != noise.shape:
        raise ShapeError(f"noise has shape {tuple(noise.shape)}, x0 {tuple(x0.shape)}")
    x_t = schedule.add_noise(x0, noise, t)
    if mask is not None:
        model_kwargs["mask"] = mask
    out = model(x_t, t, cond, **model_kwargs)
    err = (out.float() - schedule.target(x0, noise, t, prediction_type).float()).square().mean(-1)
    if mask is None:
        return err.mean()
    w = mask.expand_as(err).to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)
