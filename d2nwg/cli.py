"""The ``d2nwg`` command line (also ``python -m d2nwg``)."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

import torch

import d2nwg
from d2nwg import _ext
from d2nwg.backends import ENV_VAR


def backend_reasons(device: torch.device) -> dict[str, str | None]:
    """Why each backend can (None) or cannot run on ``device``, for any op that has it."""
    from d2nwg.backends import triton_reason

    probe = torch.empty(1, device=device)
    reasons: dict[str, str | None] = {"torch": None}
    reasons["cpp"] = _ext.cpp_reason() if device.type == "cpu" else "runs on CPU tensors"
    reasons["cuda"] = (_ext.cuda_reason(device.index) if device.type == "cuda"
                       else _ext.cuda_reason() or "runs on CUDA tensors")
    reasons["triton"] = triton_reason([probe])
    try:
        import xformers  # noqa: F401

        reasons["xformers"] = None if device.type == "cuda" else "runs on CUDA tensors"
    except ImportError:
        reasons["xformers"] = "xformers is not installed (pip install d2nwg[xformers])"
    return reasons


def op_backends() -> dict[str, list[str]]:
    """Each public op and the backends it implements, in order of preference."""
    import importlib

    table = {}
    for module, attrs in {"d2nwg.ops.tokenize": ["TOKENIZE_BACKENDS", "DETOKENIZE_BACKENDS"],
                          "d2nwg.ops.sampler_step": ["SAMPLER_STEP_BACKENDS"],
                          "d2nwg.ops.latent_attention": ["LATENT_ATTENTION_BACKENDS"]}.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for attr in attrs:
            if hasattr(mod, attr):
                name = attr.removesuffix("_BACKENDS").lower()
                table[name] = [b.name for b in getattr(mod, attr)]
    return table


def cmd_info(args: argparse.Namespace) -> int:
    info = _ext.build_info()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"d2nwg {d2nwg.__version__}  (python {platform.python_version()}, "
          f"torch {torch.__version__}, triton {triton_version})")
    print(f"extension d2nwg._C: {'built' if _ext.IMPORT_ERROR is None else _ext.IMPORT_ERROR}")
    if _ext.IMPORT_ERROR is None:
        archs = ";".join(info["cuda_archs"]) or "-"
        print(f"  CUDA ops: {'yes' if info['with_cuda'] else 'no'}; CUDA archs compiled in: "
              f"{archs} (GPU code in the binary: {', '.join(_ext.machine_code_archs()) or '-'}); "
              f"built against torch {info['torch']}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
        major, minor = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (compute capability {major}.{minor})")
    else:
        print("GPU: none visible")
    forced = os.environ.get(ENV_VAR)
    print(f"{ENV_VAR}: {forced or 'unset (automatic choice)'}")
    for device in devices:
        print(f"backends for {device.type} tensors:")
        for name, why in backend_reasons(device).items():
            print(f"  {name:9s} {'available' if why is None else 'unavailable: ' + why}")
    print("ops (backends in order of preference):")
    for op, names in op_backends().items():
        print(f"  {op:18s} {', '.join(names)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from d2nwg.demo import tokenizer_round_trip

    return tokenizer_round_trip(hidden=args.hidden, layers=args.layers,
                                intermediate=args.intermediate, vocab=args.vocab,
                                chunk_size=args.chunk_size, dtype=getattr(torch, args.dtype),
                                device=args.device, backend=args.backend)


def cmd_bench(args: argparse.Namespace) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(here, "bench")
    if not os.path.isdir(bench):
        print("d2nwg bench runs from a source checkout (the bench/ folder is not installed)",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, os.path.join(bench, "gpu_suite.py")] if args.suite else \
        [sys.executable, "-m", "pytest", "-q", bench, "--benchmark-columns=median,iqr,ops"]
    return subprocess.call(cmd + args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2nwg", description=d2nwg.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"d2nwg {d2nwg.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="version, backends available and why not, CUDA archs")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job on built-in data")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="force a backend (torch, cpp, cuda, triton)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="CPU microbenchmarks, or --suite for bench/gpu_suite.py")
    p.add_argument("--suite", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except d2nwg.D2NWGError as exc:
        print(f"d2nwg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
