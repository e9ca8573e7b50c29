"""d2nwg.timing: run counts on a CPU, do_bench (L2 flushed) for CUDA work where Triton is."""

import pytest
import torch

from d2nwg import timing
from d2nwg.timing import median_ms

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_cpu_runs_warmup_plus_repeat_and_takes_the_median(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    durations = iter([5.0, 5.0, 0.030, 0.010, 0.020])  # 2 warm-up runs, then 3 timed ones

    def fn():
        now[0] += next(durations)

    assert median_ms(fn, "cpu", repeat=3, warmup=2) == pytest.approx(20.0)
    with pytest.raises(StopIteration):  # exactly five runs
        fn()


def test_do_bench_gets_the_run_counts_as_time_budgets(monkeypatch):
    monkeypatch.setattr(timing, "_events_ms", lambda fn: 2.0)  # one run takes 2 ms
    seen = {}

    def fake_do_bench(fn, **kw):
        seen.update(kw)
        return 1.5

    assert timing._do_bench_ms(fake_do_bench, lambda: None, repeat=10, warmup=3) == 1.5
    # triton runs int(budget / its estimate) times: 10 timed and 3 warm-up runs at 2 ms
    assert seen == {"warmup": 6.0, "rep": 21.0, "return_mode": "median"}


@needs_gpu
def test_cuda_work_is_timed_by_triton_do_bench(monkeypatch):
    triton_testing = pytest.importorskip("triton.testing")
    real, calls = triton_testing.do_bench, []

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(triton_testing, "do_bench", spy)
    x = torch.randn(1 << 20, device="cuda")
    ms = median_ms(lambda: x.mul_(1.0), "cuda", repeat=5, warmup=1)
    assert calls and calls[0]["return_mode"] == "median"
    assert 0.0 < ms < 100.0


@needs_gpu
def test_cuda_without_triton_times_with_events(monkeypatch):
    monkeypatch.setattr(timing, "_do_bench", lambda: None)
    x = torch.randn(1 << 20, device="cuda")
    calls = []

    def fn():
        calls.append(1)
        x.mul_(1.0)

    ms = median_ms(fn, "cuda", repeat=4, warmup=2)
    assert len(calls) == 6 and 0.0 < ms < 100.0
