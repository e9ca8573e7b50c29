"""Built-in model shapes with synthetic weights (no downloads): used by the demo and benchmarks."""

from __future__ import annotations

import torch


def llama_state_dict(
    hidden: int = 2048,
    layers: int = 16,
    intermediate: int = 8192,
    vocab: int = 128256,
    heads: int = 32,
    kv_heads: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tied_embeddings: bool = False,
) -> dict[str, torch.Tensor]:
    """A LLaMA-shaped state dict with random weights (defaults: LLaMA-3.2-1B, untied).

    Names follow Hugging Face's LlamaForCausalLM. Weights are N(0, 0.02), norms are ones.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    head_dim = hidden // heads

    def w(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.normal_(0.0, 0.02, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        sd[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        sd[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        sd[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        sd[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        sd[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        sd[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
        sd[p + "input_layernorm.weight"] = ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = ones(hidden)
    sd["model.norm.weight"] = ones(hidden)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if tied_embeddings else w(vocab, hidden)
    return sd


def state_dict_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors of a state dict (tied tensors once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in state_dict.values()}
    return sum(seen.values())
