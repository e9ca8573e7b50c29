"""GPU-suite section: the fused sampler step and end-to-end sampling (see bench/gpu_suite.py).

Rows:
  * sampler_step, per backend that runs on the device (cuda, triton; cpp on a CPU): checked
    against sampler_step_ref on that device (fp32: rtol 1e-5; bf16: at most twice PyTorch's
    own bf16 error vs a float64 reference), then timed against
      - "torch reference": sampler_step_ref (separate tensor ops), ratio = ref_ms / ms;
      - "clone (same bytes)": a clone() moving the same number of bytes, the limit of a
        memory-bound op; ratio = clone_ms / ms is the fraction of copy bandwidth reached
        (target >= 0.85).
    Cases: fp32 with noise (DDPM / DDIM eta > 0), bf16 guided with the DPM-Solver++(2M)
    buffer, fp32 and bf16 guided with the two-step history of DPM-Solver++(3M) and UniPC.
  * sample_backends, every sampler of d2nwg.SAMPLERS (guided, 10 steps, fp32) on each backend
    of the fused step that runs on the device, checked against the same run on the torch
    backend (rtol 1e-5) and timed against it.
  * sample, a small transformer denoiser (2 blocks, width 128, 64 latent tokens of 64 values,
    batch 16): cuda_graph=True against the same eager loop (target >= 3x) and against a
    diffusers-style eager loop (DDIM; DPM-Solver++(3M) and UniPC at 10 steps); checked: the
    replayed graph returns what the eager loop does.

``tiny=True`` (CPU, Triton interpreted): small sizes, correctness first; the CUDA-graph rows
are skipped.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from d2nwg.ops.sampler_step_op import SAMPLER_STEP_BACKENDS, K, sampler_step_, sampler_step_ref  # noqa: E402
from d2nwg.sampling import SAMPLERS, sample  # noqa: E402
from d2nwg.schedule import NoiseSchedule  # noqa: E402
from d2nwg.timing import median_ms  # noqa: E402

OP_STEP, OP_SAMPLE, OP_BACKENDS = "sampler_step", "sample", "sample_backends"
BW_TARGET, GRAPH_TARGET = 0.85, 3.0


# ----------------------------------------------------------------------------------------
# The step kernel.
# ----------------------------------------------------------------------------------------
def _step_inputs(B, N, dtype, guided, noise, prev, device, seed=0, prev2=False):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(rows):
        return torch.randn(rows, N, generator=g, device=device, dtype=torch.float32).to(dtype)

    S = 50
    table = torch.randn(S, K, generator=g, device=device, dtype=torch.float32)
    return dict(
        x=rnd(B),
        model_out=rnd(2 * B if guided else B),
        table=table,
        step=torch.tensor([S // 2], device=device),
        noise=rnd(B) if noise else None,
        prev_x0=rnd(B) if prev or prev2 else None,
        prev2_x0=rnd(B) if prev2 else None,
        guided=guided,
    )


HISTORY = ("prev_x0", "prev2_x0")  # the in-place x0 history buffers, newest first


def _history(inp) -> dict:
    """Fresh copies of the step's history buffers (they are updated in place)."""
    return {k: (inp[k].clone() if inp[k] is not None else None) for k in HISTORY}


def _ref_step(inp, x, history, **kw) -> None:
    """sampler_step_ref in place on x and ``history``, with the inputs of ``inp``."""
    sampler_step_ref(
        x,
        inp["model_out"],
        inp["table"],
        inp["step"],
        inp["noise"],
        history["prev_x0"],
        inp["guided"],
        history["prev2_x0"],
        **kw,
    )


def _bytes_moved(inp) -> int:
    x = inp["x"]
    buffers = (inp["noise"] is not None) + sum(inp[k] is not None for k in HISTORY)
    reads = x.numel() + inp["model_out"].numel() + x.numel() * buffers
    writes = x.numel() * (1 + sum(inp[k] is not None for k in HISTORY))
    return (reads + writes) * x.element_size()


def _check_step(backend, inp) -> str:
    x = inp["x"]
    mine, h_mine = x.clone(), _history(inp)
    sampler_step_(
        mine,
        inp["model_out"],
        inp["table"],
        inp["step"],
        noise=inp["noise"],
        guided=inp["guided"],
        backend=backend,
        **h_mine,
    )
    if inp["prev2_x0"] is not None and not torch.equal(h_mine["prev2_x0"], inp["prev_x0"]):
        return "FAIL: prev2_x0 did not receive prev_x0's values"
    outputs = [mine] + [h_mine[k] for k in HISTORY if h_mine[k] is not None]
    if x.dtype == torch.float32:
        ref, h_ref = x.clone(), _history(inp)
        _ref_step(inp, ref, h_ref)
        refs = [ref] + [h_ref[k] for k in HISTORY if h_ref[k] is not None]
        for a, b in zip(outputs, refs):
            err = ((a - b).abs() / (1e-5 * (1 + b.abs()))).max().item()
            if not err <= 1.0:
                return f"FAIL: error {err:.2f}x the fp32 tolerance"
        return "pass"
    # low precision: at most twice PyTorch's own error in that dtype vs a float64 reference
    hi = {
        k: (
            v.double()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "table"
            else v
        )
        for k, v in inp.items()
    }
    r64, h64 = hi["x"].clone(), _history(hi)
    _ref_step(hi, r64, h64)
    own, h_own = x.clone(), _history(inp)
    _ref_step(inp, own, h_own, compute_dtype=x.dtype)
    owns = [own] + [h_own[k] for k in HISTORY if h_own[k] is not None]
    refs = [r64] + [h64[k] for k in HISTORY if h64[k] is not None]
    for a, o, r in zip(outputs, owns, refs):
        err = (a.double() - r).abs().max().item()
        own_err = (o.double() - r).abs().max().item()
        if err > 2 * own_err + 1e-12:
            return f"FAIL: error {err:.3g} > 2 x PyTorch's own {own_err:.3g}"
    return "pass"


def _step_rows(device: torch.device, tiny: bool) -> list[dict]:
    B, N = (4, 3000) if tiny else (32, 1 << 20)
    cases = [  # label, dtype, guided, noise, prev, prev2
        ("fp32, noise", torch.float32, False, True, False, False),
        ("bf16, guided + DPM++(2M) buffer", torch.bfloat16, True, False, True, False),
        ("fp32, DPM++(3M) / UniPC two-step history", torch.float32, False, False, True, True),
        ("bf16, guided + two-step history", torch.bfloat16, True, False, True, True),
    ]
    reps = dict(repeat=3, warmup=1) if tiny else dict(repeat=20, warmup=3)
    rows = []
    for label, dtype, guided, noise, prev, prev2 in cases:
        inp = _step_inputs(B, N, dtype, guided, noise, prev, device, prev2=prev2)
        # The timed calls update inp in place, step after step: the checks get these inputs.
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        nbytes = _bytes_moved(inp)
        case = f"{label}, x [{B}, {N}]"
        ref_ms = median_ms(
            lambda: _ref_step(inp, inp["x"], {k: inp[k] for k in HISTORY}), device, **reps
        )
        blob = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)  # read + write = nbytes
        clone_ms = median_ms(lambda: blob.clone(), device, **reps)
        for b in SAMPLER_STEP_BACKENDS:
            if b.name == "torch":
                continue
            why = b.why_not(inp["x"])
            if why is None and b.name == "triton" and device.type == "cpu" and not tiny:
                why = "the Triton interpreter is only for tiny runs"
            if why is not None:
                rows.append(
                    {"op": OP_STEP, "case": case, "backend": b.name, "check": f"skip: {why}"}
                )
                continue
            try:
                check = _check_step(b.name, fresh)
            except Exception as exc:  # noqa: BLE001 - report, keep going
                rows.append(
                    {
                        "op": OP_STEP,
                        "case": case,
                        "backend": b.name,
                        "check": f"FAIL: {type(exc).__name__}: {exc}",
                    }
                )
                continue

            def fn(name=b.name):
                sampler_step_(
                    inp["x"],
                    inp["model_out"],
                    inp["table"],
                    inp["step"],
                    noise=inp["noise"],
                    prev_x0=inp["prev_x0"],
                    prev2_x0=inp["prev2_x0"],
                    guided=inp["guided"],
                    backend=name,
                    check=False,
                )

            ms = median_ms(fn, device, **reps)
            bw = nbytes / ms / 1e6
            rows.append(
                {
                    "op": OP_STEP,
                    "case": case,
                    "backend": b.name,
                    "check": check,
                    "ms": ms,
                    "baseline": "torch reference",
                    "baseline_ms": ref_ms,
                    "ratio": ref_ms / ms,
                    "bandwidth_GBs": bw,
                    "target": None,
                }
            )
            rows.append(
                {
                    "op": OP_STEP,
                    "case": case,
                    "backend": b.name,
                    "check": check,
                    "ms": ms,
                    "baseline": "clone (same bytes)",
                    "baseline_ms": clone_ms,
                    "ratio": clone_ms / ms,
                    "bandwidth_GBs": bw,
                    "target": f">= {BW_TARGET} of copy bandwidth",
                }
            )
    return rows


# ----------------------------------------------------------------------------------------
# Every sampler on every backend of the fused step, against the torch backend.
# ----------------------------------------------------------------------------------------
def _sample_backend_rows(device: torch.device, tiny: bool) -> list[dict]:
    """10 guided steps of each sampler with the exact noise predictor of Gaussian data
    (elementwise, so the fused steps dominate), each backend against the torch backend."""
    B, N = (3, 37) if tiny else (16, 1 << 16)
    sched = NoiseSchedule.linear(1000)
    abar = sched.alphas_cumprod.to(device)
    cols = torch.arange(N, device=device) % 3
    mu = torch.tensor([1.5, -1.0, 0.5], device=device, dtype=torch.float64)[cols]
    sd = torch.tensor([0.7, 1.3, 2.0], device=device, dtype=torch.float64)[cols]

    def model(x, t, cond):
        a = abar[t].view(-1, 1)
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * sd**2 + 1 - a)
        return (eps + 0.1 * cond.view(-1, 1)).to(x.dtype)

    g = torch.Generator(device=device).manual_seed(3)
    x_T = torch.randn(B, N, generator=g, device=device)
    cond, uncond = torch.randn(B, generator=g, device=device), torch.zeros(1, device=device)
    reps = dict(repeat=2, warmup=1) if tiny else dict(repeat=10, warmup=2)
    rows = []
    for sampler in SAMPLERS:
        case = f"{sampler}, 10 steps, CFG 2.0, x [{B}, {N}], Gaussian predictor"

        def run(backend, sampler=sampler):
            gens = [torch.Generator(device=device).manual_seed(10 + i) for i in range(B)]
            kw = dict(cond=cond, uncond=uncond, guidance_scale=2.0, generator=gens)
            return sample(model, x_T, sched, sampler=sampler, steps=10, backend=backend, **kw)

        with torch.no_grad():
            want = run("torch")
            torch_ms = median_ms(lambda: run("torch"), device, **reps)
        for b in SAMPLER_STEP_BACKENDS:
            if b.name == "torch":
                continue
            why = b.why_not(x_T)
            if why is None and b.name == "triton" and device.type == "cpu" and not tiny:
                why = "the Triton interpreter is only for tiny runs"
            if why is not None:
                rows.append(
                    {"op": OP_BACKENDS, "case": case, "backend": b.name, "check": f"skip: {why}"}
                )
                continue
            try:
                with torch.no_grad():
                    got = run(b.name)
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    check = "pass" if err <= 1e-5 else f"FAIL: relative difference {err:.3g}"
                    ms = median_ms(lambda name=b.name: run(name), device, **reps)
            except Exception as exc:  # noqa: BLE001 - report, keep going
                rows.append(
                    {
                        "op": OP_BACKENDS,
                        "case": case,
                        "backend": b.name,
                        "check": f"FAIL: {type(exc).__name__}: {exc}",
                    }
                )
                continue
            rows.append(
                {
                    "op": OP_BACKENDS,
                    "case": case,
                    "backend": b.name,
                    "check": check,
                    "ms": ms,
                    "baseline": "same run, torch backend",
                    "baseline_ms": torch_ms,
                    "ratio": torch_ms / ms,
                    "target": None,
                }
            )
    return rows


# ----------------------------------------------------------------------------------------
# End-to-end sampling with a small transformer denoiser.
# ----------------------------------------------------------------------------------------
class SmallDenoiser(torch.nn.Module):
    """Pre-norm transformer over latent tokens [B, L, C] with a sinusoidal time embedding and
    an additive condition vector; every op is CUDA-graph capturable."""

    def __init__(self, C=64, width=128, heads=4, blocks=2, cond_dim=32):
        super().__init__()
        self.width, self.heads = width, heads
        self.inp = torch.nn.Linear(C, width)
        self.temb = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, width)
        )
        self.cond = torch.nn.Linear(cond_dim, width)
        self.blocks = torch.nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(
                torch.nn.ModuleDict(
                    {
                        "n1": torch.nn.LayerNorm(width),
                        "qkv": torch.nn.Linear(width, 3 * width),
                        "proj": torch.nn.Linear(width, width),
                        "n2": torch.nn.LayerNorm(width),
                        "mlp": torch.nn.Sequential(
                            torch.nn.Linear(width, 4 * width),
                            torch.nn.GELU(),
                            torch.nn.Linear(4 * width, width),
                        ),
                    }
                )
            )
        self.out = torch.nn.Linear(width, C)

    def time_embedding(self, t):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        ang = t.float()[:, None] * freqs[None, :]
        return self.temb(torch.cat([ang.sin(), ang.cos()], dim=1))

    def forward(self, x, t, cond=None):
        B, L, _ = x.shape
        h = self.inp(x) + self.time_embedding(t)[:, None, :]
        if cond is not None:
            h = h + self.cond(cond)[:, None, :]
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](h)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)
            h = h + blk["proj"](a)
            h = h + blk["mlp"](blk["n2"](h))
        return self.out(h)


def _diffusers_style(sampler: str):
    """The plain-loop baseline of ``sampler`` (bench/bench_sampling.py), or None."""
    import bench_sampling

    return {
        "ddim": bench_sampling.ddim_baseline,
        "dpmpp_3m": bench_sampling.dpmpp_3m_baseline,
        "unipc": bench_sampling.unipc_baseline,
    }.get(sampler)


def _sample_rows(device: torch.device, tiny: bool) -> list[dict]:
    B, L, C = (2, 8, 16) if tiny else (16, 64, 64)
    torch.manual_seed(0)
    model = SmallDenoiser(C=C, width=32 if tiny else 128).to(device).eval()
    sched = NoiseSchedule.linear(1000)
    g = torch.Generator(device=device).manual_seed(1)
    x_T = torch.randn(B, L, C, generator=g, device=device)
    cond = torch.randn(B, 32, generator=g, device=device)
    uncond = torch.zeros(1, 32, device=device)
    reps = dict(repeat=2, warmup=1) if tiny else dict(repeat=10, warmup=2)
    cases = [
        ("ddim, 50 steps", dict(sampler="ddim", steps=50, cond=cond)),
        (
            "dpmpp_2m, 25 steps, CFG 4.0",
            dict(sampler="dpmpp_2m", steps=25, cond=cond, uncond=uncond, guidance_scale=4.0),
        ),
        ("dpmpp_3m, 10 steps", dict(sampler="dpmpp_3m", steps=10)),
        ("unipc, 10 steps", dict(sampler="unipc", steps=10)),
    ]
    rows = []
    for label, kw in cases:
        case = f"{label}, x [{B}, {L}, {C}], transformer"
        baseline = _diffusers_style(kw["sampler"])
        with torch.no_grad():
            eager = sample(model, x_T, sched, **kw)
            eager_ms = median_ms(lambda: sample(model, x_T, sched, **kw), device, **reps)
            if baseline is not None:
                extra = {"cond": kw["cond"]} if "cond" in kw else {}
                base_ms = median_ms(
                    lambda: baseline(model, x_T, sched, steps=kw["steps"], **extra),
                    device,
                    **reps,
                )
        if device.type != "cuda":
            rows.append(
                {
                    "op": OP_SAMPLE,
                    "case": case,
                    "backend": "cuda_graph",
                    "check": "skip: CUDA graphs need a GPU",
                    "baseline": "eager loop",
                    "baseline_ms": eager_ms,
                }
            )
            continue
        try:
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                sample(model, x_T, sched, cuda_graph=True, **kw)  # capture (eager answer)
                graphed = sample(model, x_T, sched, cuda_graph=True, **kw)  # replay
        except Exception as exc:  # noqa: BLE001 - report, keep going
            rows.append(
                {
                    "op": OP_SAMPLE,
                    "case": case,
                    "backend": "cuda_graph",
                    "check": f"FAIL: {type(exc).__name__}: {exc}",
                }
            )
            continue
        fallback = [str(w.message) for w in caught if "cuda_graph" in str(w.message)]
        if fallback:
            check = f"FAIL: {fallback[0]}"
        else:
            err = (graphed - eager).abs().max().item()
            check = (
                "pass"
                if err <= 1e-4 * (1 + eager.abs().max().item())
                else f"FAIL: graph replay differs from eager by {err:.3g}"
            )
        with torch.no_grad():
            graph_ms = median_ms(
                lambda: sample(model, x_T, sched, cuda_graph=True, **kw), device, **reps
            )
        rows.append(
            {
                "op": OP_SAMPLE,
                "case": case,
                "backend": "cuda_graph",
                "check": check,
                "ms": graph_ms,
                "baseline": "same loop, eager",
                "baseline_ms": eager_ms,
                "ratio": eager_ms / graph_ms,
                "target": f">= {GRAPH_TARGET}x",
            }
        )
        if baseline is not None:
            rows.append(
                {
                    "op": OP_SAMPLE,
                    "case": case,
                    "backend": "cuda_graph",
                    "check": check,
                    "ms": graph_ms,
                    "baseline": "diffusers-style eager loop",
                    "baseline_ms": base_ms,
                    "ratio": base_ms / graph_ms,
                    "target": None,
                }
            )
            rows.append(
                {
                    "op": OP_SAMPLE,
                    "case": case,
                    "backend": "eager (fused step)",
                    "check": "pass",
                    "ms": eager_ms,
                    "baseline": "diffusers-style eager loop",
                    "baseline_ms": base_ms,
                    "ratio": base_ms / eager_ms,
                    "target": None,
                }
            )
    return rows


def run(device: torch.device, tiny: bool) -> list[dict]:
    return (
        _step_rows(device, tiny) + _sample_backend_rows(device, tiny) + _sample_rows(device, tiny)
    )


if __name__ == "__main__":
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for row in run(dev, tiny=dev.type != "cuda"):
        print(row)
