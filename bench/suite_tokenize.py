"""GPU-suite section: fused chunk tokenization (tokenize / detokenize), see bench/gpu_suite.py.

Each backend that runs on the device (cuda, triton; cpp on a CPU) is checked bit-exact against
tokenize_ref / detokenize_ref on that device, then timed against:
  * clone -- a same-size ``clone()`` of the weights, the limit of a memory-bound op: the ratio
             clone_ms / ms is the fraction of copy bandwidth reached (target >= 0.85 on a GPU);
  * plain -- the plain PyTorch way (flatten, normalize, pad, cat; split, de-normalize, copy_).

Full size (a GPU): a LLaMA-3.2-1B-shaped state dict (hidden 2048, 16 layers, intermediate 8192,
vocab 128256, k/v 512, untied embeddings) in bfloat16, bfloat16 tokens, chunk 256. Tiny (CPU,
Triton interpreted): a few tens of thousands of weights, so the section takes seconds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is decorated
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tokenize import layer_plan, llama_state_dict, plain_detokenize, plain_tokenize  # noqa: E402

from d2nwg.ops.tokenize_op import (  # noqa: E402
    DETOKENIZE_BACKENDS,
    TOKENIZE_BACKENDS,
    detokenize,
    detokenize_ref,
    tokenize,
    tokenize_ref,
)
from d2nwg.timing import median_ms  # noqa: E402

FULL = dict(hidden=2048, layers=16, intermediate=8192, vocab=128256, heads=32, kv_heads=8)
TINY = dict(hidden=32, layers=2, intermediate=96, vocab=200, heads=4, kv_heads=2)


def _timer(device: torch.device, tiny: bool) -> Callable[..., float]:
    """Median milliseconds (CUDA events on a GPU). ``once=True`` times a single call without
    warm-up (the Triton interpreter: its time says nothing about the kernel, and the check
    already ran it once)."""
    reps, warmup = (3, 1) if tiny else (20, 3)

    def timed(fn, once: bool = False) -> float:
        return median_ms(fn, device, repeat=1 if once else reps, warmup=0 if once else warmup)

    return timed


def run(device: torch.device, tiny: bool) -> list[dict]:
    dtype = torch.bfloat16
    sd = llama_state_dict(dtype=dtype, device=device, **(TINY if tiny else FULL))
    weights = list(sd.values())
    plan = layer_plan(weights)
    n = sum(w.numel() for w in weights)
    name = f"llama-{'tiny' if tiny else '3.2-1B'} {str(dtype).split('.')[-1]}"
    case = f"{name} ({n / 1e6:.2f}M weights, C={plan.chunk_size})"
    moved = 2 * n * dtype.itemsize  # bytes read + written (no padding at these shapes)
    time_ms = _timer(device, tiny)
    backends = ["cuda", "triton"] + (["cpp"] if device.type == "cpu" else [])
    gpu_target = (
        "clone >= 0.85 of copy bandwidth" if device.type == "cuda" else "clone >= 0.75 (CPU)"
    )

    rows_ref = torch.empty(1, plan.row_size, dtype=dtype, device=device)
    tokenize_ref(rows_ref, weights, plan)
    tokens = rows_ref.view(1, plan.num_tokens, plan.chunk_size)
    dests_ref = [torch.empty_like(w) for w in weights]
    detokenize_ref(rows_ref, dests_ref, plan)
    dests = [torch.empty_like(w) for w in weights]

    baselines = {
        "tokenize": {
            "clone": lambda: [w.clone() for w in weights],
            "plain": lambda: plain_tokenize(weights, plan, dtype),
        },
        "detokenize": {
            "clone": lambda: [w.clone() for w in weights],
            "plain": lambda: plain_detokenize(tokens, dests, plan),
        },
    }
    baseline_ms = {d: {k: time_ms(f) for k, f in fns.items()} for d, fns in baselines.items()}

    rows: list[dict] = []
    for direction, table in (("tokenize", TOKENIZE_BACKENDS), ("detokenize", DETOKENIZE_BACKENDS)):
        for backend in backends:
            row = {"op": direction, "case": case, "backend": backend}
            impl = next(b for b in table if b.name == backend)
            reason = impl.why_not(rows_ref, weights, plan)
            if reason is not None:
                rows.append(
                    {
                        **row,
                        "check": f"skip: {reason}",
                        "ms": None,
                        "baseline": "clone",
                        "baseline_ms": baseline_ms[direction]["clone"],
                        "ratio": None,
                        "bandwidth_GBs": None,
                        "target": gpu_target,
                    }
                )
                continue
            if direction == "tokenize":
                fn = lambda: tokenize(weights, plan, dtype=dtype, backend=backend)
                got = fn()
                ok = torch.equal(got, tokens)
                bad = 0 if ok else int((got != tokens).sum())
            else:
                for d in dests:
                    d.fill_(float("nan"))
                fn = lambda: detokenize(tokens, dests, plan, backend=backend)
                fn()
                ok = all(torch.equal(d, r) for d, r in zip(dests, dests_ref))
                bad = 0 if ok else sum(int((d != r).sum()) for d, r in zip(dests, dests_ref))
            check = "pass" if ok else f"FAIL: {bad} elements differ from the reference"
            try:
                ms = time_ms(fn, once=device.type == "cpu" and backend == "triton")
            except Exception as exc:  # noqa: BLE001 - a row, not a crash
                ms, check = None, f"FAIL: {type(exc).__name__}: {exc}"
            for baseline, target in (("clone", gpu_target), ("plain", "plain > 1 (>= 2 on CPU)")):
                b_ms = baseline_ms[direction][baseline]
                rows.append(
                    {
                        **row,
                        "check": check,
                        "ms": ms,
                        "baseline": baseline,
                        "baseline_ms": b_ms,
                        "ratio": b_ms / ms if ms else None,
                        "bandwidth_GBs": moved / (ms * 1e-3) / 1e9 if ms else None,
                        "target": target,
                    }
                )
    # The limit itself, for reference: the bandwidth of clone().
    clone_ms = baseline_ms["tokenize"]["clone"]
    rows.append(
        {
            "op": "clone",
            "case": case,
            "backend": "torch",
            "check": "-",
            "ms": clone_ms,
            "baseline": None,
            "baseline_ms": None,
            "ratio": None,
            "bandwidth_GBs": moved / (clone_ms * 1e-3) / 1e9,
            "target": "the limit",
        }
    )
    return rows


if __name__ == "__main__":
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for r in run(dev, tiny=dev.type == "cpu"):
        print(r)
