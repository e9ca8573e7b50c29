"""CPU benchmark of large-model synthesis: a ~100M-parameter LLaMA shape, streaming
``generate_into`` against the plain way (cases, configuration and targets: suite_large.py).

    python bench/bench_large.py                 # the ~100M LLaMA shape (several minutes)
    python bench/bench_large.py --tiny          # a small shape (seconds)

Memory: each method runs in a fresh process (peak RSS is per process); the kernel's peak
counter is reset after the target model and the generator are built, so "extra" is what a
generation adds, on the first run (which also pays one-time costs: libraries, allocator
arenas) and on a second one. Time: both methods in one process, interleaved, medians of
``--repeat`` runs after one warm-up each (the machine is shared; the noise hits both alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite_large import (  # noqa: E402
    CPU_REFERENCE,
    LLAMA_100M,
    LLAMA_TINY,
    TINY_REFERENCE,
    condition,
    denoiser_flops,
    denoiser_timer,
    llama_shapes,
    make_generator,
    matmul_flops_per_s,
    plain_way,
    streaming,
    target_model,
)

from d2nwg.generator import D2NWGConfig  # noqa: E402
from d2nwg.timing import median_ms  # noqa: E402

METHODS = {"plain": plain_way, "streaming": streaming}
# Generation at the library's sampling defaults, before and after they were chosen from the
# quality-against-steps curve (docs/steps/): streaming, the rest of the reference unchanged.
DEFAULTS = {
    "old_default": {"sampler": "dpmpp_2m", "steps": 25},
    "new_default": {"sampler": D2NWGConfig.sampler, "steps": D2NWGConfig.sample_steps},
}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _setup(tiny: bool):
    shape, reference = (LLAMA_TINY, TINY_REFERENCE) if tiny else (LLAMA_100M, CPU_REFERENCE)
    model = target_model(llama_shapes(**shape), torch.float32, "cpu")
    return model, make_generator(model, reference, "cpu")


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); the RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _kib("VmRSS")


def memory_worker(method: str, tiny: bool) -> dict:
    """Peak RSS a generation adds over the built target and generator: on the first run
    (which also pays one-time costs: libraries, allocator arenas) and on a second run."""
    model, gen = _setup(tiny)
    fn, out = METHODS[method], {"params": gen.tokenizer.num_params}
    for run in ("first", "steady"):
        rss = _reset_peak()
        fn(gen, model)
        out[f"{run}_extra_bytes"] = (_kib("VmHWM") - rss) * 1024
    out["checksum"] = float(sum(p.double().sum() for p in model.parameters()))
    return out


def timing_worker(tiny: bool, repeat: int) -> dict:
    """Both methods in one process, interleaved (the machine is shared: the noise hits both
    alike), after one warm-up each; then the denoiser's own time and a matmul of its width."""
    model, gen = _setup(tiny)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeat + 1):
        for method, fn in METHODS.items():
            times[method].append(median_ms(lambda: fn(gen, model), "cpu", repeat=1, warmup=0))
    for _ in range(repeat + 1):
        for name, sampling in DEFAULTS.items():
            run = lambda: streaming(gen, model, **sampling)
            times.setdefault(name, []).append(median_ms(run, "cpu", repeat=1, warmup=0))
    out = {f"{m}_ms": statistics.median(t[1:]) for m, t in times.items()}
    with denoiser_timer(gen) as spent:
        streaming(gen, model)
    run = gen.start_sampling(condition())
    rows = run.batch * gen.windows.size  # the denoiser's GEMM rows (a call: batch windows)
    out |= dict(
        denoiser_flops=denoiser_flops(gen),
        denoiser_ms=sum(spent) * 1e3,
        matmul_flops_per_s=matmul_flops_per_s(gen, rows, torch.device("cpu")),
        windows=gen.windows.num_windows,
        window=gen.windows.size,
        batch_windows=run.batch,
        params=gen.tokenizer.num_params,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--worker", choices=["timing", *sorted(METHODS)])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker == "timing":
        print(json.dumps(timing_worker(args.tiny, args.repeat)))
        return
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.tiny)))
        return

    def worker(name: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", name, "--repeat", str(args.repeat)]
        cmd += ["--tiny"] * args.tiny
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    t, mem = worker("timing"), {m: worker(m) for m in METHODS}
    size = t["params"] * 4
    flops = t["denoiser_flops"] / (t["denoiser_ms"] / 1e3)
    result = dict(
        t,
        speedup=t["plain_ms"] / t["streaming_ms"],
        denoiser_share=t["denoiser_ms"] / t["streaming_ms"],
        denoiser_gflops=flops / 1e9,
        matmul_gflops=t["matmul_flops_per_s"] / 1e9,
        flops_fraction=flops / t["matmul_flops_per_s"],
        memory={m: {k: v for k, v in r.items() if k.endswith("bytes")} for m, r in mem.items()},
        same_weights=abs(mem["streaming"]["checksum"] - mem["plain"]["checksum"])
        <= 1e-3 * max(1.0, abs(mem["plain"]["checksum"])),
        threads=torch.get_num_threads(),
    )
    print(f"target: LLaMA shape, {t['params'] / 1e6:.1f}M float32 parameters "
          f"({size / 2**20:.0f} MiB), {t['windows']} windows of {t['window']} tokens, "
          f"{t['batch_windows']} per streaming batch")  # fmt: skip
    print(f"{'method':10s} {'median s':>9s} {'params/s':>10s} {'extra, 1st run':>22s} "
          f"{'extra, 2nd run':>22s}")  # fmt: skip
    for name in METHODS:
        ms, m = t[f"{name}_ms"], mem[name]
        first, steady = m["first_extra_bytes"], m["steady_extra_bytes"]
        print(f"{name:10s} {ms / 1e3:9.2f} {t['params'] / (ms / 1e3) / 1e6:9.2f}M "
              f"{first / 2**20:8.0f} MiB ({first / size:6.1%}) "
              f"{steady / 2**20:8.0f} MiB ({steady / size:6.1%})")  # fmt: skip
    print(f"streaming / plain speed: {result['speedup']:.2f}x (target >= 1)")
    print(f"denoiser {result['denoiser_gflops']:.1f} GFLOP/s during its calls "
          f"({result['denoiser_share']:.0%} of the streaming time); torch.matmul of its "
          f"width {result['matmul_gflops']:.1f} GFLOP/s: {result['flops_fraction']:.0%} "
          f"(target >= 50%)")  # fmt: skip
    print(f"the two methods wrote the same weights: {result['same_weights']}")
    for name, sampling in DEFAULTS.items():
        ms = t[f"{name}_ms"]
        print(f"{name} ({sampling['sampler']}, {sampling['steps']} steps): {ms / 1e3:.2f} s, "
              f"{t['params'] / (ms / 1e3) / 1e6:.2f}M params/s")  # fmt: skip
    result["default_speedup"] = t["old_default_ms"] / t["new_default_ms"]
    print(f"new default / old default throughput: {result['default_speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
