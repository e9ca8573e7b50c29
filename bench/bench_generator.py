"""CPU benchmark of the generator: training steps/s per stage and generation throughput
(candidates/s, weights/s) against the same pipeline in plain PyTorch, as ratios of medians
measured in the same run (the cases and the baseline are in suite_generator.py).

    python bench/bench_generator.py         # prints a table
    pytest bench/bench_generator.py         # pytest-benchmark
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite_generator import CASES, make_zoo, plain_generate, run  # noqa: E402

from d2nwg.generator import D2NWG, D2NWGConfig  # noqa: E402


@pytest.fixture(scope="module")
def digit_generator() -> D2NWG:
    zoo = make_zoo(CASES["digit heads (325 weights)"]["shapes"], 32, 5, 64)
    cfg = D2NWGConfig(vae_steps=20, diffusion_steps=20)
    return D2NWG(cfg).fit(zoo, progress=False)


@pytest.mark.parametrize("pipeline", ["d2nwg", "plain"])
def test_generate_64_candidates(benchmark, digit_generator, pipeline):
    cond = torch.randn(5, 5, 64)
    if pipeline == "d2nwg":
        benchmark(lambda: digit_generator.generate(cond, num_samples=64))
    else:
        benchmark(lambda: plain_generate(digit_generator, cond, 64))


if __name__ == "__main__":
    torch.manual_seed(0)
    rows = run("cpu", steps=int(os.environ.get("BENCH_STEPS", "40")))
    print(f"{'op':9s} {'case':45s} {'ms':>9s} {'plain ms':>9s} {'ratio':>6s}  check / throughput")
    for r in rows:
        base = f"{r['baseline_ms']:9.1f}" if "baseline_ms" in r else " " * 9
        ratio = f"{r['ratio']:6.2f}" if "ratio" in r else " " * 6
        print(
            f"{r['op']:9s} {r['case']:45s} {r['ms']:9.1f} {base} {ratio}  "
            f"{r['check']}; {r['target']}"
        )
