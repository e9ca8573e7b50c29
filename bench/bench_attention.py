"""CPU benchmark of the latent denoiser (attention through latent_attention, torch backend).

A conditional LatentDenoiser (hidden 256, depth 4, 4 heads, latent 32, cross-attention to 10
condition tokens) on B=2 sequences of T=256 latent tokens: forward (no grad) and
forward+backward, fp32. Also, in the same run, the attention op alone against a direct
``F.scaled_dot_product_attention`` call (the overhead of checks and mask handling).

    python bench/bench_attention.py                      # medians and tokens/s
    python -m pytest bench/bench_attention.py -s         # pytest-benchmark
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from d2nwg.nn.conditioners import Condition
from d2nwg.nn.denoiser import LatentDenoiser, LatentDenoiserConfig
from d2nwg.ops.latent_attention_op import latent_attention
from d2nwg.timing import median_ms

CFG = LatentDenoiserConfig(latent_dim=32, hidden_dim=256, depth=4, num_heads=4, cond_dim=64)


def make_case(B: int = 2, T: int = 256, K: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = LatentDenoiser(CFG, seed=seed)
    with torch.no_grad():  # leave the adaLN-Zero init so every branch does real work
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.attention_backend = "torch"
    x = torch.randn(B, T, CFG.latent_dim, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    cond = Condition(
        torch.randn(B, K, CFG.cond_dim, generator=g),
        torch.randn(B, CFG.cond_dim, generator=g),
        torch.ones(B, K, dtype=torch.bool),
    )
    return model, x, t, cond


def forward_fn(model, x, t, cond):
    def fn():
        with torch.no_grad():
            return model(x, t, cond)

    return fn


def forward_backward_fn(model, x, t, cond):
    def fn():
        model.zero_grad(set_to_none=True)
        model(x, t, cond).square().mean().backward()

    return fn


def attention_fns(B=4, H=4, L=512, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, -17:] = False
    return (
        lambda: latent_attention(q, k, v, mask, backend="torch"),
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]),
    )


# -- pytest-benchmark -------------------------------------------------------------------------
def test_denoiser_forward(benchmark):
    model, x, t, cond = make_case()
    benchmark(forward_fn(model, x, t, cond))


def test_denoiser_forward_backward(benchmark):
    model, x, t, cond = make_case()
    benchmark(forward_backward_fn(model, x, t, cond))


def test_attention_op(benchmark):
    op, _ = attention_fns()
    benchmark(op)


def test_attention_sdpa_baseline(benchmark):
    _, sdpa = attention_fns()
    benchmark(sdpa)


# -- script -----------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="CPU benchmark of the latent denoiser")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    model, x, t, cond = make_case(args.batch, args.tokens)
    n_tok = args.batch * args.tokens
    params = sum(p.numel() for p in model.parameters())
    print(
        f"LatentDenoiser {params / 1e6:.2f}M params, B={args.batch}, T={args.tokens}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = [
        ("denoiser forward", forward_fn(model, x, t, cond)),
        ("denoiser forward+backward", forward_backward_fn(model, x, t, cond)),
    ]
    for name, fn in rows:
        ms = median_ms(fn, repeat=args.repeat, warmup=1)
        print(f"{name:28s} {ms:9.2f} ms  {n_tok / ms * 1e3:12.0f} tokens/s")
    op, sdpa = attention_fns()
    op_ms = median_ms(op, repeat=args.repeat, warmup=1)
    sdpa_ms = median_ms(sdpa, repeat=args.repeat, warmup=1)
    print(
        f"{'latent_attention (torch)':28s} {op_ms:9.2f} ms  vs direct SDPA {sdpa_ms:.2f} ms "
        f"(ratio {sdpa_ms / op_ms:.2f})"
    )


if __name__ == "__main__":
    main()
