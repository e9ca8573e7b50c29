#!/usr/bin/env python3
"""The GPU suite: build, check every CUDA and Triton kernel against its reference, time it.

    python bench/gpu_suite.py                 # on a GPU machine: build, check, time (< 5 min)
    python bench/gpu_suite.py --tiny          # anywhere: tiny sizes, Triton interpreted on CPU
    python bench/gpu_suite.py --no-build      # use the installed d2nwg as is

Each ``bench/suite_*.py`` section exposes ``run(device, tiny) -> list[dict]``, one dict per
row: op, case, backend, check ("pass" / "FAIL: ..." / "skip: ..."), ms (median), baseline,
baseline_ms, ratio (baseline_ms / ms: > 1 is faster), bandwidth_GBs, target. Writes one JSON
and one Markdown table (into $OUT when set, else bench/results/) and exits non-zero if any
check failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COLUMNS = (
    "op",
    "case",
    "backend",
    "check",
    "ms",
    "baseline",
    "baseline_ms",
    "ratio",
    "bandwidth_GBs",
    "target",
)


def build_extension() -> float:
    """Install d2nwg in place, compiling the CUDA ops for this GPU only (fast)."""
    import torch

    env = dict(os.environ, FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in env:
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            ROOT,
        ],
        check=True,
        env=env,
    )
    return time.time() - t0


def sections(only: list[str] | None):
    for path in sorted(glob.glob(os.path.join(HERE, "suite_*.py"))):
        name = os.path.basename(path)[len("suite_") : -3]
        if only and name not in only:
            continue
        spec = importlib.util.spec_from_file_location(f"d2nwg_bench_suite_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield name, module


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "/")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# d2nwg GPU suite: {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"mode {'tiny' if meta['tiny'] else 'full'}, {meta['seconds']:.0f} s in all; "
        "ratio = baseline_ms / ms (> 1: d2nwg is faster); times are medians.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (default without a GPU)")
    parser.add_argument("--no-build", action="store_true", help="do not (re)build the extension")
    parser.add_argument("--only", nargs="*", help="sections to run, e.g. tokenize sampler")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is decorated
    tiny = args.tiny or not gpu
    build_s = None if args.no_build or not gpu else build_extension()
    sys.path.insert(0, HERE)  # sections may share helpers in bench/
    import d2nwg
    from d2nwg import _ext

    device = torch.device("cuda" if gpu else "cpu")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    t0 = time.time()
    rows: list[dict] = []
    for name, module in sections(args.only):
        start = time.time()
        try:
            section_rows = module.run(device, tiny)
        except Exception as exc:  # one broken section must not hide the others
            traceback.print_exc()
            section_rows = [
                {
                    "op": name,
                    "case": "section",
                    "backend": "-",
                    "check": f"FAIL: {type(exc).__name__}: {exc}",
                }
            ]
        rows += section_rows
        print(f"[{name}] {len(section_rows)} rows in {time.time() - start:.1f} s", flush=True)
    meta = {
        "device": torch.cuda.get_device_name()
        if gpu
        else f"CPU ({platform.processor() or platform.machine()})",
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "d2nwg": d2nwg.__version__,
        "extension": _ext.IMPORT_ERROR or _ext.build_info(),
        "tiny": tiny,
        "build_seconds": build_s,
        "seconds": time.time() - t0,
    }
    os.makedirs(args.out, exist_ok=True)
    card = meta["device"].split("(")[0].strip().replace(" ", "_").replace("/", "_")
    stem = os.path.join(args.out, f"gpu_suite_{card}_{meta['date']}{'_tiny' if tiny else ''}")
    for suffix, text in (
        (".json", json.dumps({"meta": meta, "rows": rows}, indent=1, default=str)),
        (".md", markdown(meta, rows)),
    ):
        tmp = stem + suffix + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, stem + suffix)
    print(markdown(meta, rows))
    failed = [r for r in rows if str(r.get("check", "")).startswith("FAIL")]
    print(f"wrote {stem}.json and .md; {len(rows)} rows, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
