"""A tiny LLaMA-architecture causal language model for the LoRA demo (no download, no
transformers): token embedding, ``layers`` blocks of RMSNorm -> rotary causal self-attention
(torch SDPA) and RMSNorm -> SwiGLU MLP, a final RMSNorm and an untied output head.

LoRA adapters are plain state dicts: for every adapted projection ``p`` of layer ``i``
(``lora_targets``, e.g. q and v), ``layers.{i}.attn.{p}.lora_A [r, in]`` and
``layers.{i}.attn.{p}.lora_B [out, r]``; the projection becomes
``W x + (alpha / r) B A x``. Many adapters run at once: a stacked adapter holds the same names
with a leading model dimension ``[M, ...]``, and the model then takes tokens ``[M, N, T]``
(sequence n of model m goes through adapter m), so a whole zoo fine-tunes in one batched
forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from d2nwg.errors import ConfigError, KeyMismatchError, ShapeError

Adapter = dict[str, torch.Tensor]


@dataclass
class LMConfig:
    """The tiny LLaMA and its LoRA adapters."""

    vocab: int = 32
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128  # SwiGLU hidden width
    max_len: int = 64
    rope_base: float = 10000.0
    lora_rank: int = 4
    lora_alpha: float = 8.0  # the update is (alpha / r) B A
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError(
                f"LMConfig: dim={self.dim} must split into {self.heads} heads of even width"
            )
        bad = [t for t in self.lora_targets if t not in ("q", "k", "v", "o")]
        if bad or not self.lora_targets:
            raise ConfigError(f"LMConfig.lora_targets must be among q, k, v, o; got {bad}")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos / sin tables ``[length, head_dim]`` (rotate-half layout)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, hd]`` by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _project(
    linear: nn.Linear, x: torch.Tensor, lora: Adapter | None, name: str, scale: float
) -> torch.Tensor:
    """``W x`` plus the LoRA update of projection ``name`` when ``lora`` adapts it.

    ``x [M, S, in]``; the adapter's ``A [M, r, in]``, ``B [M, out, r]``."""
    y = linear(x)
    if lora is not None and f"{name}.lora_A" in lora:
        a, b = lora[f"{name}.lora_A"], lora[f"{name}.lora_B"]
        y = y + scale * torch.einsum("msr,mor->mso", torch.einsum("msi,mri->msr", x, a), b)
    return y


class Attention(nn.Module):
    def __init__(self, c: LMConfig, prefix: str) -> None:
        super().__init__()
        self.c, self.prefix = c, prefix
        self.q, self.k, self.v, self.o = (nn.Linear(c.dim, c.dim, bias=False) for _ in range(4))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lora: Adapter | None
    ) -> torch.Tensor:
        """``x [M, N, T, D]`` -> ``[M, N, T, D]``."""
        M, N, T, D = x.shape
        H, s = self.c.heads, self.c.lora_scale
        flat = x.reshape(M, N * T, D)

        def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
            return _project(getattr(self, name), inp, lora, f"{self.prefix}.{name}", s)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(M * N, T, H, D // H).transpose(1, 2)  # [MN, H, T, hd]

        cos, sin = rope[0][:T], rope[1][:T]
        q = apply_rope(heads(proj("q", flat)), cos, sin)
        k = apply_rope(heads(proj("k", flat)), cos, sin)
        y = F.scaled_dot_product_attention(q, k, heads(proj("v", flat)), is_causal=True)
        y = y.transpose(1, 2).reshape(M, N * T, D)
        return proj("o", y).view(M, N, T, D)


class Block(nn.Module):
    def __init__(self, c: LMConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.dim)
        self.attn = Attention(c, f"layers.{index}.attn")
        self.mlp_norm = RMSNorm(c.dim)
        self.gate = nn.Linear(c.dim, c.ffn, bias=False)
        self.up = nn.Linear(c.dim, c.ffn, bias=False)
        self.down = nn.Linear(c.ffn, c.dim, bias=False)

    def forward(self, x, rope, lora: Adapter | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, lora)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    """The base model; ``forward(tokens [M, N, T], lora)`` -> logits ``[M, N, T, vocab]``."""

    def __init__(self, config: LMConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = c = config or LMConfig()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.layers))
        self.norm = RMSNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                    if name.endswith(("attn.o.weight", "down.weight")):
                        p.mul_(1 / math.sqrt(2 * c.layers))
        cos, sin = rope_tables(c.dim // c.heads, c.max_len, c.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden(self, tokens: torch.Tensor, lora: Adapter | None = None) -> torch.Tensor:
        """Final (normalized) hidden states ``[M, N, T, D]`` of ``tokens [M, N, T]``."""
        if tokens.dim() != 3 or tokens.shape[-1] > self.config.max_len:
            raise ShapeError(
                f"tokens must be [M, N, T] with T <= {self.config.max_len}, "
                f"got {tuple(tokens.shape)}"
            )
        if lora is not None:
            check_adapter(lora, self.config, stacked=tokens.shape[0])
        x = self.embed(tokens)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.layers:
            x = block(x, rope, lora)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, lora: Adapter | None = None) -> torch.Tensor:
        return self.head(self.hidden(tokens, lora))


# ----------------------------------------------------------------------------------------
# Adapters.
# ----------------------------------------------------------------------------------------
def adapter_shapes(c: LMConfig) -> dict[str, tuple[int, int]]:
    """Name -> shape of one adapter: ``lora_A [r, in]``, ``lora_B [out, r]``."""
    shapes = {}
    for i in range(c.layers):
        for p in c.lora_targets:
            shapes[f"layers.{i}.attn.{p}.lora_A"] = (c.lora_rank, c.dim)
            shapes[f"layers.{i}.attn.{p}.lora_B"] = (c.dim, c.lora_rank)
    return shapes


def check_adapter(lora: Adapter, c: LMConfig, stacked: int | None = None) -> None:
    """Names and shapes of an adapter (``stacked``: with a leading dimension of that size)."""
    shapes = adapter_shapes(c)
    if set(lora) != set(shapes):
        missing, extra = sorted(set(shapes) - set(lora)), sorted(set(lora) - set(shapes))
        raise KeyMismatchError(f"LoRA adapter: missing {missing[:4]}, unexpected {extra[:4]}")
    lead = () if stacked is None else (stacked,)
    for name, shape in shapes.items():
        if tuple(lora[name].shape) != lead + shape:
            raise ShapeError(f"LoRA {name}: expected {lead + shape}, got {tuple(lora[name].shape)}")


def init_adapter(c: LMConfig, seed: int) -> Adapter:
    """One adapter as LoRA starts: ``A`` kaiming-uniform (as nn.Linear), ``B = 0``.

    The same ``seed`` gives the same ``A``: a zoo fine-tuned from one shared ``A`` has no
    ``(A, B) -> (MA, BM^-1)`` ambiguity between its members."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(c.dim)
    out = {}
    for name, shape in adapter_shapes(c).items():
        if name.endswith("lora_A"):
            out[name] = (torch.rand(shape, generator=g) * 2 - 1) * bound
        else:
            out[name] = torch.zeros(shape)
    return out


def stack_adapters(adapters: list[Adapter]) -> Adapter:
    """A list of M adapters -> one stacked adapter ``[M, ...]``."""
    return {k: torch.stack([a[k].float() for a in adapters]) for k in adapters[0]}


def unstack_adapters(stacked: Adapter) -> list[Adapter]:
    n = next(iter(stacked.values())).shape[0]
    return [{k: v[i].clone() for k, v in stacked.items()} for i in range(n)]


# ----------------------------------------------------------------------------------------
# Training and evaluation.
# ----------------------------------------------------------------------------------------
def token_losses(model: TinyLlama, tokens: torch.Tensor, lora: Adapter | None) -> torch.Tensor:
    """Next-token cross-entropy ``[M, N, T - 1]`` of ``tokens [M, N, T]``."""
    logits = model(tokens, lora)[:, :, :-1]
    ce = F.cross_entropy(logits.flatten(0, 2), tokens[:, :, 1:].flatten(), reduction="none")
    return ce.view(*tokens.shape[:2], -1)


@torch.no_grad()
def lm_loss(
    model: TinyLlama, tokens: torch.Tensor, lora: Adapter | None = None, max_models: int = 64
) -> torch.Tensor:
    """Mean per-token loss ``[M]`` of model m (the base plus adapter m, or the base alone) on
    its sequences ``tokens [M, N, T]``; evaluated ``max_models`` at a time."""
    out = []
    for s in range(0, tokens.shape[0], max_models):
        part = None if lora is None else {k: v[s : s + max_models] for k, v in lora.items()}
        out.append(token_losses(model, tokens[s : s + max_models], part).mean((1, 2)))
    return torch.cat(out)


@torch.no_grad()
def sequence_features(model: TinyLlama, tokens: torch.Tensor) -> torch.Tensor:
    """The base model's final hidden states, mean-pooled per sequence: ``[M, N, T]`` ->
    ``[M, N, D]`` (what conditions the generator on a task's example sequences)."""
    return model.hidden(tokens).mean(2)


def pretrain(
    model: TinyLlama,
    batch: Callable[[int, torch.Generator], torch.Tensor],
    steps: int,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train the base on ``batch(step, generator) -> tokens [N, T]`` (AdamW, cosine decay);
    returns the loss per step. The model ends frozen, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine(step, steps)
        loss = token_losses(model, batch(step, g)[None], None).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return losses


def finetune_adapters(
    model: TinyLlama,
    adapters: Adapter,
    batch: Callable[[int, torch.Generator], torch.Tensor],
    steps: int,
    lr: float = 1e-2,
    seed: int = 0,
    a_lr_scale: float = 1 / 16,
) -> Adapter:
    """Fine-tune M stacked adapters at once, the base frozen: adapter m on
    ``batch(step, generator)[m]`` (tokens ``[M, N, T]``). Adam is per entry, so this is M
    independent fine-tunings; returns the trained stacked adapter.

    ``A`` learns at ``a_lr_scale * lr`` (LoRA+, Hayou et al. 2024, trains B 16x faster than
    A): besides converging faster, it keeps every ``A`` near its initialization, so adapters
    fine-tuned from one shared ``A`` stay comparable entry by entry (with one learning rate,
    Adam moves ``A`` by several times its initial scale and nearby tasks drift apart)."""
    g = torch.Generator().manual_seed(seed)
    params = {k: v.clone().float().requires_grad_(True) for k, v in adapters.items()}
    groups = [
        {"params": [v for k, v in params.items() if k.endswith("lora_A")], "scale": a_lr_scale},
        {"params": [v for k, v in params.items() if not k.endswith("lora_A")], "scale": 1.0},
    ]
    opt = torch.optim.Adam(groups, lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"] * _cosine(step, steps)
        # sum over models of each model's mean loss: model m's gradient is its own
        loss = token_losses(model, batch(step, g), params).mean((1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def _cosine(step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
