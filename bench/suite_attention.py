"""GPU suite section: latent attention (Triton) against SDPA's backends and xformers.

Cases: bf16, no mask, sequence lengths 256..8192 at a fixed token budget (B * L = 16384),
head dims 64 (16 heads) and 128 (8 heads); one key-padding-masked case (only SDPA's
efficient / cuDNN / math backends take a mask). Forward and forward+backward. Each triton
row is checked on that device against an fp32 reference (first batch element, two heads) by
the rule "error at most twice PyTorch's own bf16 error" (PyTorch = SDPA in bf16).

Targets: forward >= 1.0x the best SDPA backend, forward+backward >= 0.9x (rows "best SDPA").
TFLOP/s (4 * B * H * Lq * Lk * D per forward, 2.5x that for forward+backward) goes into the
``tflops`` / ``baseline_tflops`` fields and the case text.

``tiny=True`` (CPU, Triton interpreter): correctness rows only, at tiny sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2nwg.ops.latent_attention_op import latent_attention, latent_attention_ref
from d2nwg.testing import assert_close_lowp
from d2nwg.timing import median_ms

OP = "latent_attention"
FWD_TARGET, FWDBWD_TARGET = 1.0, 0.9
TOKENS = 16384  # B * L per case
MATH_MAX_L = 2048  # the math backend materializes [B, H, L, L]


def _sdpa_backends() -> dict:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    names = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "math": "MATH",
    }
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _sdpa_fn(which):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, mask):
        attn_mask = None if mask is None else mask[:, None, None, :]
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    return fn


def _xformers_fn():
    try:
        import xformers.ops as xops
    except Exception as exc:
        return None, f"xformers not importable ({type(exc).__name__})"

    def fn(q, k, v, mask):  # inputs already [B, L, H, D] (transposed once, outside timing)
        bias = None
        if mask is not None:
            B, LQ, H, _ = q.shape
            LK = k.shape[1]
            pad = (LK + 7) // 8 * 8
            bias = torch.zeros(B, H, LQ, pad, dtype=q.dtype, device=q.device)[..., :LK]
            bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)

    return fn, None


def _triton(q, k, v, mask):
    return latent_attention(q, k, v, mask, backend="triton")


def _inputs(B, H, L, D, dtype, device, masked, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (
        torch.randn(B, H, L, D, generator=g, device=device, dtype=dtype) for _ in range(4)
    )
    mask = None
    if masked:
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g, device=device)
        mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
    return q, k, v, do, mask


def _check(q, k, v, do, mask, backward: bool) -> str:
    """Triton vs an fp32 reference on a slice, by the 2x-PyTorch rule (PyTorch = SDPA bf16)."""
    sl = (slice(0, 1), slice(0, 2))
    q, k, v, do = (t[sl].detach().clone() for t in (q, k, v, do))
    m = None if mask is None else mask[:1]

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_(backward) for x in xs]
        out = fn(*xs, m)
        if not backward:
            return [out.detach()]
        return [out.detach(), *torch.autograd.grad(out, xs, do.to(out.dtype))]

    try:
        got = run(_triton, q, k, v)
        ref = run(
            lambda a, b, c, mm: latent_attention_ref(a, b, c, mm), q.float(), k.float(), v.float()
        )
        pt = run(lambda a, b, c, mm: latent_attention(a, b, c, mm, backend="torch"), q, k, v)
        for name, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref, pt):
            assert_close_lowp(a, r, p, name=name)
    except Exception as exc:  # noqa: BLE001 - a row reports, it does not crash the suite
        return f"FAIL: {type(exc).__name__}: {str(exc)[:200]}"
    return "pass"


def _timed(fn, q, k, v, do, mask, backward: bool, device) -> float:
    if not backward:

        def call():
            with torch.no_grad():
                fn(q, k, v, mask)
    else:
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))

        def call():
            out = fn(qs, ks, vs, mask)
            torch.autograd.grad(out, (qs, ks, vs), do)

    return median_ms(call, device=device, repeat=10, warmup=3)


def _tiny_rows(device) -> list[dict]:
    rows = []
    for B, H, L, D, masked in ((1, 2, 48, 16, True), (2, 1, 33, 32, False)):
        q, k, v, do, mask = _inputs(B, H, L, D, torch.float32, device, masked)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            check = _check_fp32(q, k, v, do, mask, backward)
            rows.append(
                {
                    "op": OP,
                    "case": f"tiny B={B} H={H} L={L} D={D}"
                    f"{' masked' if masked else ''} fp32 {mode}",
                    "backend": "triton",
                    "check": check,
                    "ms": None,
                    "baseline": "torch",
                    "baseline_ms": None,
                    "ratio": None,
                    "bandwidth_GBs": None,
                    "target": "correctness only (CPU)",
                }
            )
    return rows


def _check_fp32(q, k, v, do, mask, backward: bool) -> str:
    try:
        outs = []
        for fn in (_triton, lambda a, b, c, m: latent_attention_ref(a, b, c, m)):
            xs = [
                t.detach().double().clone() if fn is not _triton else t.detach().clone()
                for t in (q, k, v)
            ]
            xs = [x.requires_grad_(backward) for x in xs]
            out = fn(*xs, mask)
            res = [out.detach()]
            if backward:
                res += torch.autograd.grad(out, xs, do.to(out.dtype))
            outs.append(res)
        for a, b in zip(*outs):
            err = (a.double() - b).abs().max().item()
            if err > 1e-5 + 1e-4 * b.abs().max().item():
                return f"FAIL: max error {err:.2e}"
    except Exception as exc:  # noqa: BLE001
        return f"FAIL: {type(exc).__name__}: {str(exc)[:200]}"
    return "pass"


CASES = [(L, D, False) for D in (64, 128) for L in (256, 1024, 4096, 8192)] + [(4096, 64, True)]


def run(device: torch.device, tiny: bool) -> list[dict]:
    if tiny or device.type != "cuda":
        return _tiny_rows(device)
    return _full_rows(device, CASES, TOKENS)


def _full_rows(device, cases, tokens) -> list[dict]:
    dtype = torch.bfloat16
    sdpa = _sdpa_backends()
    xfn, xwhy = _xformers_fn()
    rows: list[dict] = []
    for L, D, masked in cases:
        H = 16 if D == 64 else 8
        B = max(1, tokens // L)
        q, k, v, do, mask = _inputs(B, H, L, D, dtype, device, masked)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            flops = 4.0 * B * H * L * L * D * (2.5 if backward else 1.0)
            if mask is not None:
                flops *= mask.float().mean().item()
            case = f"B={B} H={H} L={L} D={D}{' masked' if masked else ''} bf16 {mode}"
            check = _check(q, k, v, do, mask, backward)
            try:
                ms = _timed(_triton, q, k, v, do, mask, backward, device)
            except Exception as exc:  # noqa: BLE001
                rows.append(
                    {
                        "op": OP,
                        "case": case,
                        "backend": "triton",
                        "check": f"FAIL: {type(exc).__name__}: {str(exc)[:200]}",
                    }
                )
                continue
            tflops = flops / ms / 1e9
            base_rows = []
            for name, which in sdpa.items():
                if name == "math" and L > MATH_MAX_L:
                    base_rows.append(
                        (f"sdpa-{name}", None, f"skip: math materializes LxL at L={L}")
                    )
                    continue
                try:
                    bms = _timed(_sdpa_fn(which), q, k, v, do, mask, backward, device)
                    base_rows.append((f"sdpa-{name}", bms, check))
                except Exception as exc:  # noqa: BLE001 - e.g. flash takes no mask
                    base_rows.append(
                        (
                            f"sdpa-{name}",
                            None,
                            f"skip: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                        )
                    )
            if xfn is None:
                base_rows.append(("xformers", None, f"skip: {xwhy}"))
            else:
                qt, kt, vt, dot = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))
                try:
                    bms = _timed(xfn, qt, kt, vt, dot, mask, backward, device)
                    base_rows.append(("xformers", bms, check))
                except Exception as exc:  # noqa: BLE001
                    base_rows.append(
                        ("xformers", None, f"skip: {type(exc).__name__}: {str(exc)[:120]}")
                    )
            for baseline, bms, row_check in base_rows:
                rows.append(
                    {
                        "op": OP,
                        "case": f"{case} ({tflops:.0f} TFLOP/s)",
                        "backend": "triton",
                        "check": row_check,
                        "ms": ms,
                        "baseline": baseline,
                        "baseline_ms": bms,
                        "ratio": None if bms is None else bms / ms,
                        "bandwidth_GBs": None,
                        "target": None,
                        "tflops": tflops,
                        "baseline_tflops": None if bms is None else flops / bms / 1e9,
                    }
                )
            timed = [(b, t) for b, t, _ in base_rows if t is not None and b.startswith("sdpa")]
            if timed:
                best, bms = min(timed, key=lambda x: x[1])
                target = FWDBWD_TARGET if backward else FWD_TARGET
                ratio = bms / ms
                rows.append(
                    {
                        "op": OP,
                        "case": f"{case} vs best SDPA",
                        "backend": "triton",
                        "check": check,
                        "ms": ms,
                        "baseline": f"best SDPA ({best})",
                        "baseline_ms": bms,
                        "ratio": ratio,
                        "bandwidth_GBs": None,
                        "target": f">= {target}x ({'met' if ratio >= target else 'MISSED'})",
                        "tflops": tflops,
                        "baseline_tflops": flops / bms / 1e9,
                    }
                )
        del q, k, v, do
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
