"""GPU-suite section (and the CPU benchmark bench_large.py): synthesis of a LLaMA-shaped model.

Parameters generated per second and peak memory of streaming ``D2NWG.generate_into`` against
the plain way in the same run: sample every window of the model in one sampler run, decode
all, detokenize to a state dict, ``load_state_dict`` (what a research release does). The
generator is untrained (``D2NWG.untrained``): speed and memory do not depend on its weights.

Reference generator configuration (``REFERENCE``): 4096 weights per token, latent width 64,
windows of 256 tokens, a denoiser 256 wide and 4 deep (4 heads), DPM-Solver++(2M) with 25
steps and classifier-free guidance 2.0 (two denoiser rows per window and step), bf16 on
CUDA. On a 2-core CPU, ``CPU_REFERENCE`` keeps the shapes and the width but halves the depth and
takes 5 steps, so that a run takes a minute, not ten.

Targets (from the issue): the 1.24B LLaMA-3.2-1B shape at >= 100M parameters/s on one
H100/H200 with peak memory below the target's size + 2 GiB; on a CPU, a ~100M LLaMA shape
with streaming no slower than the plain way, peak extra memory <= 25% of the target's
size, and the denoiser's FLOP/s >= half of a plain ``torch.matmul`` of its width.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.timing import median_ms

LLAMA_1B = dict(hidden=2048, layers=16, intermediate=8192, vocab=128256, heads=32, kv_heads=8)
LLAMA_100M = dict(hidden=768, layers=12, intermediate=2048, vocab=32000, heads=12, kv_heads=4)
LLAMA_TINY = dict(hidden=64, layers=2, intermediate=128, vocab=512, heads=4, kv_heads=2)
REFERENCE = dict(
    condition="dataset", chunk_size=4096, latent_dim=64, window=256, hidden_dim=256, depth=4,
    num_heads=4, sampler="dpmpp_2m", sample_steps=25, guidance_scale=2.0,
)  # fmt: skip
CPU_REFERENCE = dict(REFERENCE, depth=2, sample_steps=5)
TINY_REFERENCE = dict(REFERENCE, chunk_size=256, window=16, hidden_dim=32, depth=1, sample_steps=3)
COND_FEATURES = 64
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


def llama_shapes(
    hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a LLaMA decoder with tied embeddings (``lm_head`` = ``embed``)."""
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def target_model(shapes: dict, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """An ``nn.Module`` with these parameters (zeros: resident, so that a generation's
    memory is not confused with the target's first touch) and ``lm_head`` tied."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
    root.add_module("lm_head", nn.Module())
    root.lm_head.weight = root.model.embed_tokens.weight
    return root


def make_generator(model: nn.Module, reference: dict, device: str | torch.device) -> D2NWG:
    template = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    cfg = D2NWGConfig(**reference, device=str(device))
    return D2NWG.untrained(template, cfg, cond_features=COND_FEATURES)


def condition() -> torch.Tensor:
    return torch.randn(1, 5, COND_FEATURES, generator=torch.Generator().manual_seed(0))


def plain_way(gen: D2NWG, model: nn.Module, seed: int = 0) -> None:
    """Every window in one sampler run, decode all, detokenize, load_state_dict."""
    device = next(model.parameters()).device
    sd = gen.generate(condition(), 1, seed=seed, batch_windows=gen.windows.num_windows)[0]
    model.load_state_dict({k: v.to(device) for k, v in sd.items()})


def streaming(gen: D2NWG, model: nn.Module, seed: int = 0, **sampling) -> None:
    gen.generate_into(model, condition(), seed=seed, **sampling)


def denoiser_flops(gen: D2NWG) -> float:
    """FLOPs of the denoiser over one generation: windows x steps x one window's call (two
    rows under guidance), counted by torch's FlopCounterMode on a real call."""
    c, win = gen.config, gen.windows
    den = gen.model.denoiser
    device = next(den.parameters()).device
    rows = 2 if c.guidance_scale != 1.0 else 1
    x = torch.zeros(rows, win.size, c.latent_dim, device=device)
    cond = den.null_condition(rows, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        den(x, torch.zeros(rows, dtype=torch.long, device=device), cond,
            positions=win.positions[:1].expand(rows, -1, -1).to(device))  # fmt: skip
    return float(counter.get_total_flops()) * win.num_windows * c.sample_steps


@contextlib.contextmanager
def denoiser_timer(gen: D2NWG):
    """Yields a list that collects the seconds of every denoiser call made inside."""
    den, spent, t0 = gen.model.denoiser, [], []

    def sync() -> None:
        if next(den.parameters()).is_cuda:
            torch.cuda.synchronize()

    def before(*_) -> None:
        sync()
        t0.append(time.perf_counter())

    def after(*_) -> None:
        sync()
        spent.append(time.perf_counter() - t0.pop())

    hooks = [den.register_forward_pre_hook(before), den.register_forward_hook(after)]
    try:
        yield spent
    finally:
        for h in hooks:
            h.remove()


def matmul_flops_per_s(gen: D2NWG, rows: int, device: torch.device) -> float:
    """A plain torch.matmul of the denoiser's width (its MLP's first GEMM), FLOP/s."""
    W = gen.config.hidden_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(rows, W, device=device, dtype=dtype)
    b = torch.randn(W, 4 * W, device=device, dtype=dtype)
    return 2 * rows * W * 4 * W / (median_ms(lambda: a @ b, device, repeat=10) / 1e3)


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v.float() - sb[k].float()).abs().max()) for k, v in a.state_dict().items())


def run(device: str | torch.device = "cuda", tiny: bool = False) -> list[dict]:
    """The GPU-suite rows: the 1.24B target end to end (tiny: a small LLaMA shape)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    shape, reference = (LLAMA_TINY, TINY_REFERENCE) if tiny else (LLAMA_1B, REFERENCE)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = target_model(llama_shapes(**shape), dtype, device)
    gen = make_generator(model, reference, device)
    n = gen.tokenizer.num_params
    size = n * dtype.itemsize
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if gpu else 0
    t0 = time.perf_counter()
    streaming(gen, model, cuda_graph=gpu)  # first run: CUDA-graph capture, autotuning
    first_s = time.perf_counter() - t0
    ms = median_ms(lambda: streaming(gen, model, cuda_graph=gpu), device, repeat=2, warmup=0)
    extra = (torch.cuda.max_memory_allocated(device) - before) if gpu else float("nan")
    reference_model = target_model(llama_shapes(**shape), dtype, device)
    plain_ms = median_ms(lambda: plain_way(gen, reference_model), device, repeat=1, warmup=0)
    err = max_abs_diff(model, reference_model)
    flops = denoiser_flops(gen) / (ms / 1e3)
    card = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in card), None)
    rows = [
        dict(
            op="synthesize",
            case=f"LLaMA {n / 1e9:.3g}B params ({'tiny' if tiny else '1B shape'}), streaming",
            backend="d2nwg generate_into",
            check="pass" if err < 0.05 else f"FAIL: differs from the plain way by {err:.2e}",
            ms=ms,
            baseline="plain: all windows, decode, detokenize, load_state_dict",
            baseline_ms=plain_ms,
            ratio=plain_ms / ms,
            target=f"{n / (ms / 1e3) / 1e6:.0f}M params/s (target >= 100M/s); first run "
            f"{first_s:.1f} s; peak extra {extra / 2**30:.2f} GiB (target <= 2 GiB over the "
            f"{size / 2**30:.2f} GiB model); denoiser {flops / 1e12:.1f} TFLOP/s"
            + (f" = {flops / 1e12 / peak:.1%} of the card's bf16 peak" if peak else ""),
        )
    ]
    return rows
