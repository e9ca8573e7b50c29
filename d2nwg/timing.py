"""Wall-clock medians for benchmarks and the demo (CUDA-synchronized where needed).

On a CUDA device the timing is ``triton.testing.do_bench``'s where Triton is importable: it
flushes the L2 cache before every timed run, so GPU figures are cold-cache figures comparable
with other projects'. Without Triton, CUDA events around each run (warm L2); on a CPU,
``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(
    fn: Callable[[], object], device: torch.device | str = "cpu", repeat: int = 10, warmup: int = 2
) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    device = torch.device(device)
    if device.type != "cuda":
        return _median(fn, repeat, warmup, _clock_ms)
    do_bench = _do_bench()
    with torch.cuda.device(device):
        if do_bench is None:
            return _median(fn, repeat, warmup, _events_ms)
        return _do_bench_ms(do_bench, fn, repeat, warmup)


def _do_bench() -> Callable | None:
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def _do_bench_ms(do_bench: Callable, fn: Callable[[], object], repeat: int, warmup: int) -> float:
    """do_bench takes time budgets (ms), not run counts: turn the counts into budgets with one
    timed run, so that it runs about ``warmup`` and ``repeat`` times (at least once each)."""
    one = max(_events_ms(fn), 1e-3)
    return do_bench(fn, warmup=warmup * one, rep=(repeat + 0.5) * one, return_mode="median")


def _median(
    fn: Callable[[], object], repeat: int, warmup: int, timed: Callable[[Callable], float]
) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeat))


def _events_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _clock_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
