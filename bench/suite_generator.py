"""GPU-suite section (and CPU benchmark, see bench_generator.py): the generator end to end.

For the demo's models (5-way digit heads, 325 weights, 6 tokens) and a wider, 1M-weight MLP:
- ``fit``: training steps/s of each stage (ChunkVAE, latent diffusion), measured from the
  loss log of a short run;
- ``generate``: candidates/s and weights/s of ``D2NWG.generate`` against a plain PyTorch
  implementation of the same pipeline with the same trained networks: tokens decoded, then
  a DPM-Solver++(2M) loop of separate tensor ops around the same denoiser with SDPA
  attention (the way diffusers' DPMSolverMultistepScheduler steps), and an unfused
  detokenize (split, de-normalize, reshape, cast). Ratio = plain / d2nwg (> 1: d2nwg faster).
"""

from __future__ import annotations

import torch

from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.sampling import default_timesteps
from d2nwg.timing import median_ms
from d2nwg.zoo import ModelZoo


def make_zoo(
    shapes: dict[str, tuple[int, ...]], models: int, classes: int, features: int, seed: int = 0
) -> ModelZoo:
    g = torch.Generator().manual_seed(seed)
    zoo = ModelZoo()
    for _ in range(models):
        sd = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
        zoo.add(sd, condition=torch.randn(classes, 5, features, generator=g))
    return zoo


CASES = {
    "digit heads (325 weights)": dict(shapes={"weight": (5, 64), "bias": (5,)}, features=64),
    "MLP (1.05M weights)": dict(
        shapes={
            "fc1.weight": (1024, 512),
            "fc1.bias": (1024,),
            "fc2.weight": (512, 1024),
            "fc2.bias": (512,),
        },
        features=64,
    ),
}


@torch.no_grad()
def plain_generate(
    gen: D2NWG, condition: torch.Tensor, num_samples: int, seed: int = 0
) -> list[dict]:
    """The same pipeline in plain PyTorch (the baseline of the ratio)."""
    c, tok, den = gen.config, gen.tokenizer, gen.model.denoiser
    device = next(den.parameters()).device
    den.attention_backend = "torch"
    try:
        cond = gen.encode_condition(condition, device).repeat_interleave(num_samples)
        null = den.null_condition(num_samples, device)
        K = max(cond.tokens.shape[1], null.tokens.shape[1])
        both = torch.cat([cond.pack(K), null.pack(K)])
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(num_samples, tok.num_tokens, c.latent_dim, generator=g).to(device)
        abar = c.noise_schedule().alphas_cumprod.float().to(device)
        ts = default_timesteps(c.timesteps, c.sample_steps)
        prev_x0, h_prev = None, None
        for i, t in enumerate(ts):
            out = den(
                torch.cat([x, x]),
                torch.full((2 * num_samples,), t, device=device),
                both,
                positions=tok.positions.to(device),
                layer_kinds=tok.kinds.to(device),
            )
            o_c, o_u = out.chunk(2)
            o = o_u + c.guidance_scale * (o_c - o_u)
            a_t = abar[t]
            alpha_t, sigma_t = a_t.sqrt(), (1 - a_t).sqrt()
            x0 = _to_x0(o, x, alpha_t, sigma_t, c.prediction_type)
            if i == len(ts) - 1:
                x = x0
                break
            a_s = abar[ts[i + 1]]
            alpha_s, sigma_s = a_s.sqrt(), (1 - a_s).sqrt()
            h = torch.log(alpha_s / sigma_s) - torch.log(alpha_t / sigma_t)
            if prev_x0 is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
            x = (sigma_s / sigma_t) * x - alpha_s * torch.expm1(-h) * d
            prev_x0, h_prev = x0, h
        chunks = gen.vae.decode(x / gen.latent_scale).float().cpu()
    finally:
        den.attention_backend = None
    return [_plain_detokenize(tok, chunks[n]) for n in range(num_samples)]


def _to_x0(o, x, alpha, sigma, prediction_type):
    if prediction_type == "epsilon":
        return (x - sigma * o) / alpha
    if prediction_type == "v":
        return alpha * x - sigma * o
    return o


def _plain_detokenize(tok, tokens: torch.Tensor) -> dict:
    flat = tokens.reshape(-1).double()
    plan = tok.plan
    out = {}
    for spec, off, shift, scale in zip(tok.layers, plan.offset, plan.shift, plan.scale):
        vals = flat[off : off + spec.numel] * scale + shift
        out[spec.name] = vals.reshape(spec.shape).to(spec.torch_dtype)
    return out


def run(
    device: str | torch.device = "cuda", tiny: bool = False, steps: int | None = None
) -> list[dict]:
    rows = []
    device = str(device)
    steps = steps or (30 if tiny else 200)
    for name, case in CASES.items():
        if tiny and "MLP" in name:
            continue
        zoo = make_zoo(
            case["shapes"], models=16 if tiny else 64, classes=5, features=case["features"]
        )
        # plain_generate is a DPM-Solver++(2M) loop: the generator samples the same way
        cfg = D2NWGConfig(vae_steps=steps, diffusion_steps=steps, log_every=max(1, steps // 4),
                          device=device, sampler="dpmpp_2m", sample_steps=25)  # fmt: skip
        gen = D2NWG(cfg).fit(zoo, progress=False)
        for stage, rate in gen.history["steps_per_s"].items():
            rows.append(
                dict(
                    op="fit",
                    case=f"{name}: {stage} stage",
                    backend="d2nwg",
                    check="pass",
                    ms=1e3 / rate,
                    target="steps/s = 1000 / ms",
                )
            )
        cond = zoo[0].condition
        gpu = device.startswith("cuda")
        counts = (4,) if tiny else (16, 256) if gpu or "heads" in name else (4,)
        repeat = 5 if gpu else 3
        for k in counts:
            ms = median_ms(lambda: gen.generate(cond, num_samples=k), device, repeat=repeat)
            base = median_ms(lambda: plain_generate(gen, cond, k), device, repeat=repeat)
            fused = gen.generate(cond, num_samples=1, seed=0)[0]
            plain = plain_generate(gen, cond, 1, seed=0)[0]
            err = max(float((fused[n] - plain[n]).abs().max()) for n in fused)
            rows.append(
                dict(
                    op="generate",
                    case=f"{name}: {k} candidates",
                    backend="d2nwg",
                    check="pass" if err < 1e-3 else f"FAIL: differs from plain by {err:.2e}",
                    ms=ms,
                    baseline="plain PyTorch pipeline",
                    baseline_ms=base,
                    ratio=base / ms,
                    target=f"{k * 1e3 / ms:.3g} candidates/s, "
                    f"{k * gen.tokenizer.num_params * 1e3 / ms:.3g} weights/s",
                )
            )
    return rows
