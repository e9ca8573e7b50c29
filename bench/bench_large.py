"""CPU benchmark of large-model synthesis: a ~100M-parameter LLaMA shape, streaming
``generate_into`` against the plain way (cases, configuration and targets: suite_large.py).

    python bench/bench_large.py                 # the ~100M LLaMA shape (a few minutes)
    python bench/bench_large.py --tiny          # a small shape (seconds)

Each method runs in a fresh process (peak RSS is per process; the kernel's peak counter is
reset after the target model and the generator are built, so "extra" is what generation
adds). Times are medians of ``--repeat`` runs after one warm-up, all in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite_large import (  # noqa: E402
    CPU_REFERENCE,
    LLAMA_100M,
    LLAMA_TINY,
    TINY_REFERENCE,
    denoiser_flops,
    denoiser_timer,
    llama_shapes,
    make_generator,
    matmul_flops_per_s,
    plain_way,
    streaming,
    target_model,
)

from d2nwg.timing import median_ms  # noqa: E402

METHODS = {"plain": plain_way, "streaming": streaming}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(method: str, tiny: bool, repeat: int) -> dict:
    """Build the target and the generator, reset the peak-RSS counter, run ``method``."""
    shape, reference = (LLAMA_TINY, TINY_REFERENCE) if tiny else (LLAMA_100M, CPU_REFERENCE)
    model = target_model(llama_shapes(**shape), torch.float32, "cpu")
    gen = make_generator(model, reference, "cpu")
    rss = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    fn = METHODS[method]
    fn(gen, model)  # the warm-up run is the one whose peak memory counts
    peak = _kib("VmHWM")
    ms = median_ms(lambda: fn(gen, model), "cpu", repeat=repeat, warmup=0)
    row = dict(method=method, ms=ms, extra_bytes=(peak - rss) * 1024)
    row["params"] = gen.tokenizer.num_params
    row["checksum"] = float(sum(p.double().sum() for p in model.parameters()))
    if method == "streaming":
        with denoiser_timer(gen) as spent:
            fn(gen, model)
        row["denoiser_flops"] = denoiser_flops(gen)
        row["denoiser_ms"] = sum(spent) * 1e3
        run = gen._start(torch.zeros(1, 5, 64), {})
        rows = 2 * run.batch * gen.windows.size  # the denoiser's GEMM rows under guidance
        row["matmul_flops_per_s"] = matmul_flops_per_s(gen, rows, torch.device("cpu"))
        row["windows"] = gen.windows.num_windows
        row["window"] = gen.windows.size
        row["batch_windows"] = run.batch
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--worker", choices=sorted(METHODS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tiny, args.repeat)))
        return
    rows = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--worker", method, "--repeat", str(args.repeat)]
        out = subprocess.run(
            cmd + ["--tiny"] * args.tiny, check=True, capture_output=True, text=True
        )
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
    s, p = rows["streaming"], rows["plain"]
    size = s["params"] * 4
    flops = s["denoiser_flops"] / (s["denoiser_ms"] / 1e3)
    result = dict(
        params=s["params"],
        windows=s["windows"],
        batch_windows=s["batch_windows"],
        streaming_ms=s["ms"],
        plain_ms=p["ms"],
        speedup=p["ms"] / s["ms"],
        streaming_extra_fraction=s["extra_bytes"] / size,
        plain_extra_fraction=p["extra_bytes"] / size,
        denoiser_share=s["denoiser_ms"] / s["ms"],
        denoiser_gflops=flops / 1e9,
        matmul_gflops=s["matmul_flops_per_s"] / 1e9,
        flops_fraction=flops / s["matmul_flops_per_s"],
        same_weights=abs(s["checksum"] - p["checksum"]) <= 1e-3 * max(1.0, abs(p["checksum"])),
        threads=torch.get_num_threads(),
    )
    print(f"target: LLaMA shape, {s['params'] / 1e6:.1f}M float32 parameters "
          f"({size / 2**20:.0f} MiB), {s['windows']} windows of {s['window']} tokens, "
          f"{s['batch_windows']} per streaming batch")  # fmt: skip
    print(f"{'method':10s} {'median s':>9s} {'params/s':>10s} {'extra memory':>22s}")
    for name, r in (("plain", p), ("streaming", s)):
        rate, extra = r["params"] / (r["ms"] / 1e3) / 1e6, r["extra_bytes"]
        print(f"{name:10s} {r['ms'] / 1e3:9.2f} {rate:9.2f}M "
              f"{extra / 2**20:9.0f} MiB ({extra / size:5.1%} of model)")  # fmt: skip
    print(f"streaming / plain speed: {result['speedup']:.2f}x (target >= 1)")
    fraction = result["streaming_extra_fraction"]
    print(f"streaming extra memory: {fraction:.1%} of the model (target <= 25%)")
    print(f"denoiser {result['denoiser_gflops']:.1f} GFLOP/s during its calls "
          f"({result['denoiser_share']:.0%} of the streaming time); "
          f"torch.matmul of its width {result['matmul_gflops']:.1f} GFLOP/s: "
          f"{result['flops_fraction']:.0%} (target >= 50%)")  # fmt: skip
    print(f"the two methods wrote the same weights: {result['same_weights']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
