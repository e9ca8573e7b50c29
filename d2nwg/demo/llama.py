"""The LoRA demo's language model: a small ``transformers.LlamaForCausalLM`` (random init, no
download) and LoRA adapters in PEFT's own format, trained many at once.

An adapter is a state dict under PEFT's key names, ``base_model.model.<module>.lora_A.weight
[r, in]`` and ``...lora_B.weight [out, r]`` for every adapted projection (``lora_targets``,
e.g. ``q_proj`` and ``v_proj``): what ``PeftModel.save_pretrained`` writes, what
:meth:`d2nwg.ModelZoo.from_peft` reads. The projection becomes ``W x + (alpha / r) B A x``,
PEFT's LoRA with no dropout.

Batched LoRA: a stacked adapter holds the same names with a leading model dimension ``[M, ...]``
and the model takes tokens ``[M, N, T]``, laid out as one batch of ``M * N`` sequences;
forward hooks on the adapted projections add adapter ``m``'s update to the rows of model
``m`` (:func:`batched_lora`). So a whole zoo fine-tunes in one forward pass of the
transformers model, and ``tests/test_lora_demo.py`` checks that this equals PEFT's forward.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from d2nwg.errors import ConfigError, KeyMismatchError, ShapeError
from d2nwg.hf import require

Adapter = dict[str, torch.Tensor]
PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module's path in its key names


@dataclass
class LMConfig:
    """The small LLaMA and its LoRA adapters."""

    vocab: int = 32
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128  # SwiGLU hidden width
    max_len: int = 64
    rope_base: float = 10000.0
    lora_rank: int = 4
    lora_alpha: float = 8.0  # the update is (alpha / r) B A
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError(
                f"LMConfig: dim={self.dim} must split into {self.heads} heads of even width"
            )
        allowed = ("q_proj", "k_proj", "v_proj", "o_proj")
        bad = [t for t in self.lora_targets if t not in allowed]
        if bad or not self.lora_targets:
            raise ConfigError(f"LMConfig.lora_targets must be among {allowed}; got {bad}")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def llama_config(self):
        """The ``transformers.LlamaConfig`` of the base (untied head, no dropout)."""
        transformers = require("transformers")
        return transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.dim,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_len,
            rope_theta=self.rope_base,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )

    def lora_config(self):
        """The ``peft.LoraConfig`` of the adapters (no dropout: training and PEFT agree)."""
        peft = require("peft")
        return peft.LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.lora_targets),
            lora_dropout=0.0,
        )


def build_base(c: LMConfig, seed: int):
    """A randomly initialized ``LlamaForCausalLM`` (transformers' init, from ``seed``)."""
    transformers = require("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(c.llama_config())


def save_base(model: nn.Module, folder: str | os.PathLike) -> None:
    """``model.save_pretrained(folder)`` (config.json and model.safetensors)."""
    with _no_progress_bars():
        model.save_pretrained(folder)


def load_base(folder: str | os.PathLike):
    """The base saved by ``save_pretrained`` in ``folder``, frozen, in eval mode."""
    transformers = require("transformers")
    with _no_progress_bars():
        model = transformers.LlamaForCausalLM.from_pretrained(folder)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for a tiny model's files (restored after)."""
    logging = require("transformers").utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------
# Adapters.
# ----------------------------------------------------------------------------------------
def lora_modules(model: nn.Module, c: LMConfig) -> dict[str, nn.Linear]:
    """The projections the adapters adapt, by their path in ``model``."""
    found = {
        name: m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in c.lora_targets and isinstance(m, nn.Linear)
    }
    if not found:
        raise KeyMismatchError(f"{type(model).__name__} has no module among {c.lora_targets}")
    return found


def adapter_shapes(model: nn.Module, c: LMConfig) -> dict[str, tuple[int, int]]:
    """PEFT key name -> shape of one adapter: ``lora_A [r, in]``, ``lora_B [out, r]``."""
    shapes = {}
    for name, m in lora_modules(model, c).items():
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (c.lora_rank, m.in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, c.lora_rank)
    return shapes


def check_adapter(lora: Adapter, shapes: dict[str, tuple[int, int]], stacked: int | None) -> None:
    """Names and shapes of an adapter (``stacked``: with a leading dimension of that size)."""
    if set(lora) != set(shapes):
        missing, extra = sorted(set(shapes) - set(lora)), sorted(set(lora) - set(shapes))
        raise KeyMismatchError(f"LoRA adapter: missing {missing[:4]}, unexpected {extra[:4]}")
    lead = () if stacked is None else (stacked,)
    for name, shape in shapes.items():
        if tuple(lora[name].shape) != lead + shape:
            raise ShapeError(f"LoRA {name}: expected {lead + shape}, got {tuple(lora[name].shape)}")


def init_adapter(shapes: dict[str, tuple[int, int]], seed: int) -> Adapter:
    """One adapter as LoRA starts: ``A`` kaiming-uniform (PEFT's default), ``B = 0``.

    The same ``seed`` gives the same ``A``: a zoo fine-tuned from one shared ``A`` has no
    ``(A, B) -> (MA, BM^-1)`` ambiguity between its members."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("lora_A.weight"):
            out[name] = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[1])
        else:
            out[name] = torch.zeros(shape)
    return out


def stack_adapters(adapters: Sequence[Adapter]) -> Adapter:
    """A list of M adapters -> one stacked adapter ``[M, ...]``."""
    return {k: torch.stack([a[k].float() for a in adapters]) for k in adapters[0]}


def unstack_adapters(stacked: Adapter) -> list[Adapter]:
    n = next(iter(stacked.values())).shape[0]
    return [{k: v[i].clone() for k, v in stacked.items()} for i in range(n)]


@contextlib.contextmanager
def batched_lora(
    model: nn.Module, c: LMConfig, lora: Adapter | None, models: int
) -> Iterator[None]:
    """Within the block, a forward pass of ``model`` on ``models * N`` sequences (model-major)
    runs sequence ``n`` of model ``m`` through the base plus adapter ``m`` of the stacked
    ``lora [models, ...]`` (None: the base alone). Forward hooks on the adapted projections
    add ``(alpha / r) B_m A_m x``; removed on exit."""
    if lora is None:
        yield
        return
    modules = lora_modules(model, c)
    M = models
    check_adapter(lora, adapter_shapes(model, c), stacked=M)

    def hook_for(name: str) -> Callable:
        a = lora[f"{PEFT_PREFIX}{name}.lora_A.weight"]  # [M, r, in]
        b = lora[f"{PEFT_PREFIX}{name}.lora_B.weight"]  # [M, out, r]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]  # [M * N, T, in]
            xm = x.reshape(M, -1, x.shape[-1])
            delta = torch.einsum("msr,mor->mso", torch.einsum("msi,mri->msr", xm, a), b)
            return output + c.lora_scale * delta.reshape(output.shape)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------
# Training and evaluation.
# ----------------------------------------------------------------------------------------
def _check_tokens(model: nn.Module, tokens: torch.Tensor) -> None:
    max_len = model.config.max_position_embeddings
    if tokens.dim() != 3 or tokens.shape[-1] > max_len:
        raise ShapeError(f"tokens must be [M, N, T] with T <= {max_len}, got {tuple(tokens.shape)}")


def logits(
    model: nn.Module, c: LMConfig, tokens: torch.Tensor, lora: Adapter | None = None
) -> torch.Tensor:
    """Logits ``[M, N, T, vocab]`` of ``tokens [M, N, T]`` (model m through adapter m)."""
    _check_tokens(model, tokens)
    with batched_lora(model, c, lora, models=tokens.shape[0]):
        out = model(input_ids=tokens.flatten(0, 1), use_cache=False).logits
    return out.view(*tokens.shape, -1)


def token_losses(
    model: nn.Module, c: LMConfig, tokens: torch.Tensor, lora: Adapter | None = None
) -> torch.Tensor:
    """Next-token cross-entropy ``[M, N, T - 1]`` of ``tokens [M, N, T]``."""
    return next_token_losses(logits(model, c, tokens, lora), tokens)


def next_token_losses(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``[..., T - 1]`` of logits ``scores [..., T, V]`` against the next
    tokens of ``tokens [..., T]``."""
    ce = F.cross_entropy(
        scores[..., :-1, :].flatten(0, -2), tokens[..., 1:].flatten(), reduction="none"
    )
    return ce.view(*tokens.shape[:-1], -1)


@torch.no_grad()
def lm_loss(
    model: nn.Module,
    c: LMConfig,
    tokens: torch.Tensor,
    lora: Adapter | None = None,
    max_models: int = 64,
) -> torch.Tensor:
    """Mean per-token loss ``[M]`` of model m (the base plus adapter m, or the base alone) on
    its sequences ``tokens [M, N, T]``; evaluated ``max_models`` at a time."""
    out = []
    for s in range(0, tokens.shape[0], max_models):
        part = None if lora is None else {k: v[s : s + max_models] for k, v in lora.items()}
        out.append(token_losses(model, c, tokens[s : s + max_models], part).mean((1, 2)))
    return torch.cat(out)


@torch.no_grad()
def sequence_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The base's final (normalized) hidden states, mean-pooled per sequence: ``[M, N, T]`` ->
    ``[M, N, D]`` (what conditions the generator on a task's example sequences)."""
    _check_tokens(model, tokens)
    hidden = model.model(input_ids=tokens.flatten(0, 1), use_cache=False).last_hidden_state
    return hidden.mean(1).view(*tokens.shape[:2], -1)


def pretrain(
    model: nn.Module,
    c: LMConfig,
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
        loss = token_losses(model, c, batch(step, g)[None]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return losses


def finetune_adapters(
    model: nn.Module,
    c: LMConfig,
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
    is_a = {k: k.endswith("lora_A.weight") for k in params}
    groups = [
        {"params": [v for k, v in params.items() if is_a[k]], "scale": a_lr_scale},
        {"params": [v for k, v in params.items() if not is_a[k]], "scale": 1.0},
    ]
    opt = torch.optim.Adam(groups, lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"] * _cosine(step, steps)
        # sum over models of each model's mean loss: model m's gradient is its own
        loss = token_losses(model, c, batch(step, g), params).mean((1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def _cosine(step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


# ----------------------------------------------------------------------------------------
# PEFT adapter folders.
# ----------------------------------------------------------------------------------------
def save_peft_adapters(
    base: nn.Module, c: LMConfig, adapters: Sequence[Adapter], folders: Sequence[str]
) -> None:
    """Write each adapter to its folder with ``peft``: one ``get_peft_model`` on a copy of
    the base, the adapter's weights set into it, ``save_pretrained``."""
    peft = require("peft")
    if len(adapters) != len(folders):
        raise ConfigError(f"{len(adapters)} adapters for {len(folders)} folders")
    model = peft.get_peft_model(copy.deepcopy(base), c.lora_config())
    for adapter, folder in zip(adapters, folders):
        result = peft.set_peft_model_state_dict(model, adapter)
        if result.unexpected_keys:
            raise KeyMismatchError(f"{folder}: PEFT does not know {result.unexpected_keys[:4]}")
        model.save_pretrained(folder)


@torch.no_grad()
def peft_losses(base: nn.Module, folders: Sequence[str], tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token loss of each sequence, ``[F, N]``, of adapter folder f on its sequences
    ``tokens [F, N, T]``: each adapter loaded with ``PeftModel.from_pretrained`` on ``base``
    and unloaded again (``base`` ends as it was)."""
    peft = require("peft")
    if tokens.dim() != 3 or tokens.shape[0] != len(folders):
        raise ShapeError(f"tokens must be [{len(folders)}, N, T], got {tuple(tokens.shape)}")
    out = []
    for folder, toks in zip(folders, tokens):
        model = peft.PeftModel.from_pretrained(base, folder).eval()  # injects into base
        try:
            scores = model(input_ids=toks, use_cache=False).logits
        finally:
            model.unload()  # takes the LoRA layers out of base again
        out.append(next_token_losses(scores, toks).mean(-1))
    return torch.stack(out)
