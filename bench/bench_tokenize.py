"""CPU benchmark of the fused chunk tokenization ops (the cpp backend).

Tokenize and detokenize a LLaMA-shaped state dict (scaled for a CPU: hidden 1024, 4 layers,
intermediate 4096, vocab 32000, embeddings untied) in float32 and bfloat16, tokens of the same
dtype as the weights, chunk size 256, layer granularity, per-layer normalization. Compared,
in the same run, with:

  * clone  -- a same-size ``clone()`` of every weight: the limit for a memory-bound op
              (``clone_ms / cpp_ms`` is the fraction of copy bandwidth reached);
  * copy_  -- ``copy_`` into preallocated tensors (the limit without allocation costs);
  * plain  -- what a user writes in PyTorch: flatten, normalize, pad, ``torch.cat``; and the
              inverse: split, de-normalize, reshape, ``copy_`` into the weights.

Targets on a CPU: both directions >= 0.75x the clone bandwidth and >= 2x the plain way.
``tokenize`` allocates its output like ``clone()`` does (on a CPU, first-touch page faults of
the fresh buffer are a large part of both); ``tokenize(out=)`` writes into preallocated tokens
and is the one to compare with ``copy_``.

    python bench/bench_tokenize.py                        # table of medians and ratios
    python -m pytest bench/bench_tokenize.py -s           # pytest-benchmark, ratios printed
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2nwg.ops.tokenize_op import ChunkPlan, detokenize, tokenize
from d2nwg.shapes import llama_state_dict
from d2nwg.tokenizer import WeightTokenizer

CHUNK = 256


def layer_plan(weights: list[torch.Tensor], chunk_size: int = CHUNK) -> ChunkPlan:
    """Layer granularity, normalized by the statistics of these weights (computed once, untimed)."""
    sd = {str(i): w for i, w in enumerate(weights)}
    return WeightTokenizer.from_state_dict(sd, chunk_size=chunk_size).fit([sd]).plan


# ---- the plain PyTorch way (float32 arithmetic, as a user would write it) ----
def plain_tokenize(
    weights: list[torch.Tensor], plan: ChunkPlan, dtype: torch.dtype
) -> torch.Tensor:
    parts = []
    for w, m, r, span in zip(weights, plan.shift, plan.rscale, plan.span):
        x = (w.flatten().float() - m) * r
        parts.append(F.pad(x, (0, span - x.numel())))
    return torch.cat(parts).view(1, plan.num_tokens, plan.chunk_size).to(dtype)


def plain_detokenize(tokens: torch.Tensor, weights: list[torch.Tensor], plan: ChunkPlan) -> None:
    for part, w, m, s in zip(
        tokens.view(-1).split(list(plan.span)), weights, plan.shift, plan.scale
    ):
        w.copy_((part[: w.numel()].float() * s + m).view(w.shape))


@dataclass
class Case:
    """One state dict, its plan, preallocated buffers and the timed candidates."""

    name: str
    weights: list[torch.Tensor]
    plan: ChunkPlan
    backend: str = "cpp"

    def __post_init__(self) -> None:
        self.dtype = self.weights[0].dtype
        self.tokens = tokenize(self.weights, self.plan, dtype=self.dtype, backend=self.backend)
        self.dests = [torch.empty_like(w) for w in self.weights]
        self.copies = [torch.empty_like(w) for w in self.weights]
        self.bytes = 2 * sum(w.numel() for w in self.weights) * self.dtype.itemsize  # read + write

    def candidates(self, direction: str) -> dict[str, Callable[[], object]]:
        if direction == "tokenize":  # allocates its output, as clone() does
            op = lambda: tokenize(self.weights, self.plan, dtype=self.dtype, backend=self.backend)
            plain = lambda: plain_tokenize(self.weights, self.plan, self.dtype)
        elif direction == "tokenize(out=)":  # into preallocated tokens: compare with copy_
            out = torch.empty_like(self.tokens)
            op = lambda: tokenize(self.weights, self.plan, out=out, backend=self.backend)
            plain = lambda: plain_tokenize(self.weights, self.plan, self.dtype)
        else:
            op = lambda: detokenize(self.tokens, self.dests, self.plan, backend=self.backend)
            plain = lambda: plain_detokenize(self.tokens, self.dests, self.plan)
        return {
            self.backend: op,
            "clone": lambda: [w.clone() for w in self.weights],
            "copy_": lambda: [c.copy_(w) for c, w in zip(self.copies, self.weights)],
            "plain": plain,
        }


def make_case(
    dtype: torch.dtype, scale: str = "cpu", backend: str = "cpp", device: str | torch.device = "cpu"
) -> Case:
    sizes = {
        "cpu": dict(hidden=1024, layers=4, intermediate=4096, vocab=32000, heads=16, kv_heads=4),
        "tiny": dict(hidden=64, layers=2, intermediate=256, vocab=512, heads=4, kv_heads=1),
    }[scale]
    sd = llama_state_dict(dtype=dtype, device=device, **sizes)
    weights = list(sd.values())
    return Case(f"llama-{scale}-{str(dtype).split('.')[-1]}", weights, layer_plan(weights), backend)


def medians(
    fns: dict[str, Callable[[], object]],
    rounds: int = 7,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds of each function, rounds interleaved so that noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def compare(case: Case, direction: str, rounds: int = 7) -> dict[str, float]:
    """Medians (ms) and the ratios of the op against the limit and the plain way."""
    t = medians(case.candidates(direction), rounds=rounds)
    op = t[case.backend]
    return {
        **{f"{k}_ms": v * 1e3 for k, v in t.items()},
        "clone_fraction": t["clone"] / op,  # >= 0.75: fraction of clone bandwidth
        "copy_fraction": t["copy_"] / op,
        "plain_speedup": t["plain"] / op,  # >= 2
        "GBs": case.bytes / op / 1e9,
    }


def report_line(case: Case, direction: str, r: dict[str, float]) -> str:
    return (
        f"{case.name:<18} {direction:<14} {r[case.backend + '_ms']:8.1f} {r['clone_ms']:8.1f} "
        f"{r['copy__ms']:8.1f} {r['plain_ms']:8.1f} {r['GBs']:7.2f} "
        f"{r['clone_fraction']:8.2f}x {r['copy_fraction']:7.2f}x {r['plain_speedup']:8.2f}x"
    )


HEADER = (
    f"{'case':<18} {'direction':<14} {'cpp ms':>8} {'clone ms':>8} {'copy_ ms':>8} "
    f"{'plain ms':>8} {'GB/s':>7} {'vs clone':>9} {'vs copy_':>8} {'vs plain':>9}"
)


# ---- pytest-benchmark ----
try:
    import pytest
except ImportError:  # the main below needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def case(request) -> Case:
        from d2nwg import _ext

        if _ext.cpp_reason():
            pytest.skip(_ext.cpp_reason())
        return make_case(request.param)

    @pytest.mark.parametrize("direction", ["tokenize", "tokenize(out=)", "detokenize"])
    def test_tokenize_cpp(benchmark, case, direction):
        """Times the cpp op; the ratios to clone and the plain way come from the same run."""
        ratios = compare(case, direction)
        benchmark.group = f"{direction}-{case.name}"
        benchmark.extra_info.update(ratios)
        print(f"\n{HEADER}\n{report_line(case, direction, ratios)}")
        benchmark.pedantic(case.candidates(direction)["cpp"], rounds=5, warmup_rounds=1)

    @pytest.mark.parametrize("direction", ["tokenize", "detokenize"])
    @pytest.mark.parametrize("baseline", ["clone", "copy_", "plain"])
    def test_baseline(benchmark, case, direction, baseline):
        benchmark.group = f"{direction}-{case.name}"
        benchmark.pedantic(case.candidates(direction)[baseline], rounds=5, warmup_rounds=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="cpp tokenize/detokenize vs clone and plain PyTorch"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scale", choices=["cpu", "tiny"], default="cpu")
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
        f"{args.rounds} interleaved rounds; 'vs clone' = clone_ms / cpp_ms (target >= 0.75), "
        f"'vs plain' = plain_ms / cpp_ms (target >= 2)"
    )
    print(HEADER)
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(dtype, args.scale)
        for direction in ("tokenize", "tokenize(out=)", "detokenize"):
            print(report_line(case, direction, compare(case, direction, args.rounds)), flush=True)
        del case


if __name__ == "__main__":
    main()
