"""The ``d2nwg`` command line (also ``python -m d2nwg``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

import d2nwg
from d2nwg import _ext
from d2nwg.backends import ENV_VAR, device_reasons


def cmd_info(args: argparse.Namespace) -> int:
    info = _ext.build_info()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(
        f"d2nwg {d2nwg.__version__}  (python {platform.python_version()}, "
        f"torch {torch.__version__}, triton {triton_version})"
    )
    print(f"extension d2nwg._C: {'built' if _ext.IMPORT_ERROR is None else _ext.IMPORT_ERROR}")
    if _ext.IMPORT_ERROR is None:
        archs = ";".join(info["cuda_archs"]) or "-"
        print(
            f"  CUDA ops: {'yes' if info['with_cuda'] else 'no'}; CUDA archs compiled in: "
            f"{archs} (GPU code in the binary: {', '.join(_ext.machine_code_archs()) or '-'}); "
            f"built against torch {info['torch']}"
        )
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
        for name, why in device_reasons(device).items():
            print(f"  {name:9s} {'available' if why is None else 'unavailable: ' + why}")
    print(_generator_info())
    print("ops (backends in order of preference):")
    for op, backends in d2nwg.ops.BACKENDS.items():
        print(f"  {op:18s} {', '.join(b.name for b in backends)}")
    return 0


def _generator_info() -> str:
    """The generator's options and what training and the demo can use here."""
    import importlib.metadata as md

    import torch.distributed as dist

    from d2nwg.files import LOCK_NAME
    from d2nwg.generator import BATCH_ELEMENTS, CONDITIONS, WINDOW_DRAWS, D2NWGConfig
    from d2nwg.training.distributed import TIMEOUT_ENV, collective_timeout

    timeout = collective_timeout().total_seconds()

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "missing (pip install d2nwg[demo])"

    backends = [
        b
        for b, ok in (
            ("gloo", dist.is_available() and dist.is_gloo_available()),
            ("nccl", dist.is_available() and dist.is_nccl_available()),
        )
        if ok
    ]
    return "\n".join(
        [
            f"generator: d2nwg.D2NWG, conditions {', '.join(CONDITIONS)}; samplers "
            f"{', '.join(d2nwg.SAMPLERS)} (default {D2NWGConfig.sampler}, "
            f"{D2NWGConfig.sample_steps} steps); prediction types "
            f"{', '.join(d2nwg.PREDICTION_TYPES)}",
            "large models: D2NWGConfig(window=W) windows, overlapping (window_stride, default "
            "W // 2: every sampler step averages each token over its windows, so the windows of "
            f"one model agree; training draws up to {WINDOW_DRAWS} per model a step at any "
            "offset, the ends as often as the middle, or window_batch pairs), streaming "
            "generate_into "
            "(batch_windows), generate_to_directory shards + index, include/exclude, "
            f"delta=True; default batch ~{BATCH_ELEMENTS['cpu']:.3g} decoded values on cpu, "
            f"{BATCH_ELEMENTS['cuda']:.3g} on cuda",
            "distributed training and sharded generation (torchrun): "
            + (", ".join(backends) or "torch.distributed unavailable")
            + f"; elastic restarts with --resume auto; collective timeout {timeout:g} s "
            f"({TIMEOUT_ENV})",
            f"reliability: one writer per directory ({LOCK_NAME}); NaN/Inf losses stop fit, "
            "NaN/Inf files are refused",
            "class rows: D2NWGConfig(class_rows=[globs]) writes row k of a classifier layer "
            "from class k's condition token (equivariant to class order; the digits demo's "
            "default)",
            "text conditions: any encoder's [L, E] rows (one slot per row), or "
            "d2nwg.text.hashed_ngrams (no download); d2nwg demo --condition text",
            f"demo: scikit-learn {version('scikit-learn')}, matplotlib {version('matplotlib')}; "
            "d2nwg demo --model head|mlp|cnn (a head, or every layer of a network), --window W",
            _hf_info(),
        ]
    )


def _hf_info() -> str:
    """The Hugging Face extra: what it does and the versions of its packages."""
    from d2nwg.hf import EXTRA, versions

    installed = versions()
    found = ", ".join(f"{k} {v or 'not installed'}" for k, v in installed.items())
    missing = "" if all(installed.values()) else f" ({EXTRA})"
    return (
        "hugging face: ModelZoo.from_peft, save_peft / generate --peft (PEFT adapter "
        "folders), transformers models as targets (model_config=), d2nwg demo --lora "
        f"(PEFT adapters of a LlamaForCausalLM); {found}{missing}"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    if args.lora and args.condition != "dataset":
        raise d2nwg.ConfigError(
            "--condition text is for the digits demo (the LoRA demo's conditions "
            "are example sequences)"
        )
    if args.lora and args.model != "head":
        raise d2nwg.ConfigError("--model is for the digits demo (the LoRA demo generates adapters)")
    if args.lora and args.window is not None:
        raise d2nwg.ConfigError(
            "--window is for the digits demo (the LoRA demo's adapters are 8 tokens: one window)"
        )
    if args.lora:
        from d2nwg.demo.lora import run
    else:
        from d2nwg.demo import run
    from d2nwg.demo.common import DemoOptions

    progress = not args.no_progress
    run(DemoOptions(args.out, args.device, args.seed, args.quick, progress, args.sampler,
                    args.steps, args.condition, args.model, args.window))  # fmt: skip
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from d2nwg.files import read_json
    from d2nwg.generator import D2NWG, D2NWGConfig

    zoo = d2nwg.ModelZoo.from_directory(args.zoo)
    data = read_json(args.config) if args.config else {}
    try:
        config = D2NWGConfig.from_dict(data)
    except (d2nwg.ConfigError, TypeError) as exc:
        raise d2nwg.ConfigError(f"{args.config}: {exc}") from None
    gen = D2NWG(config).fit(zoo, out=args.out, resume=args.resume, progress=not args.no_progress)
    from d2nwg.training import DistContext

    if DistContext.from_env(torch.device("cpu")).is_main:
        gen.save(os.path.join(args.out, "generator"))
        print(f"wrote the generator to {os.path.join(args.out, 'generator')}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from d2nwg.files import read_safetensors, save_safetensors
    from d2nwg.generator import D2NWG
    from d2nwg.zoo import untie

    gen = D2NWG.load(args.generator)
    condition = None
    if args.condition:
        _, tensors = read_safetensors(args.condition)
        if "condition" not in tensors:
            raise d2nwg.FileFormatError(
                f"{args.condition}: no tensor named 'condition' (found {sorted(tensors)[:8]})"
            )
        condition = tensors["condition"]
    sampling = {
        k: v
        for k, v in (
            ("sampler", args.sampler),
            ("steps", args.steps),
            ("guidance_scale", args.guidance_scale),
            ("batch_windows", args.batch_windows),
        )
        if v is not None
    }
    base = read_safetensors(args.base)[1] if args.base else None
    if args.peft:
        if args.shards:
            raise d2nwg.ConfigError("--peft and --shards are two output formats: pick one")
        folders = gen.save_peft(
            args.out, condition, num_samples=args.num, base=base, seed=args.seed, **sampling
        )
        print(f"wrote {len(folders)} PEFT adapter folders to {args.out}")
        return 0
    if args.shards:
        if args.num != 1:
            raise d2nwg.ConfigError("--shards writes one model (sample 0 of --seed): use --num 1")
        index = gen.generate_to_directory(
            args.out,
            condition,
            shard_size=args.shard_size * 2**20,
            base=base,
            seed=args.seed,
            **sampling,
        )
        files = len(set(index["weight_map"].values()))
        print(f"wrote {files} shards and model.safetensors.index.json to {args.out}")
        return 0
    sds = gen.generate(condition, num_samples=args.num, base=base, seed=args.seed, **sampling)
    for i, sd in enumerate(sds):
        stored, aliases = untie(sd)  # tied names are stored once (safetensors requires it)
        meta = {"format": "d2nwg.sample/1", "seed": str(args.seed), "index": str(i)}
        if aliases:
            meta["aliases"] = json.dumps(aliases)
        save_safetensors(stored, os.path.join(args.out, f"sample_{i:05d}.safetensors"), meta)
    print(f"wrote {len(sds)} samples to {args.out}")
    return 0


def _int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum`` (argparse turns the error into one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _resume(text: str) -> str:
    """An argparse type: ``--resume auto`` (``--resume`` alone is True)."""
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes 'auto' or nothing, got {text!r}")
    return text


def _device(text: str) -> str:
    """An argparse type: a device the generator can use (checked by resolve_device)."""
    from d2nwg.devices import resolve_device

    try:
        resolve_device(text)
    except d2nwg.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cmd_bench(args: argparse.Namespace) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(here, "bench")
    if not os.path.isdir(bench):
        print(
            "d2nwg bench runs from a source checkout (the bench/ folder is not installed)",
            file=sys.stderr,
        )
        return 2
    cmd = (
        [sys.executable, os.path.join(bench, "gpu_suite.py")]
        if args.suite
        else [sys.executable, "-m", "pytest", "-q", bench, "--benchmark-columns=median,iqr,ops"]
    )
    return subprocess.call(cmd + args.rest)


def _command(sub, name: str, func, help: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand running ``func(args)``, with its example command lines as the epilog."""
    p = sub.add_parser(
        name,
        help=help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n" + "\n".join(f"  {line}" for line in examples) if examples else None,
    )
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2nwg", description=d2nwg.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"d2nwg {d2nwg.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    at_least_0, at_least_1 = _int_at_least(0), _int_at_least(1)

    _command(sub, "info", cmd_info, "version, backends available and why not, CUDA archs")

    p = _command(
        sub,
        "demo",
        cmd_demo,
        "train a generator of digit-task heads or networks (or, --lora, of LoRA adapters) and "
        "evaluate it against the zoo and memorization baselines",
        "d2nwg demo --quick --out demo_out",
        "d2nwg demo --model mlp --window 16 --out mlp_out",
        "d2nwg demo --lora --quick --out lora_out",
        "torchrun --standalone --nproc_per_node=2 -m d2nwg demo --quick",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    quick = "a smaller run (on a 2-core CPU: heads 37 s, mlp 83 s, cnn 65 s; --lora ~100 s)"
    p.add_argument("--quick", action="store_true", help=quick)
    lora = (
        "the LoRA demo: generate PEFT adapters of a small transformers LLaMA for unseen "
        "synthetic languages (needs the hf extra: pip install d2nwg[hf])"
    )
    p.add_argument("--lora", action="store_true", help=lora)
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=at_least_0, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sampler = "the sampler of the candidates (default: the generator's)"
    p.add_argument("--sampler", choices=d2nwg.SAMPLERS, help=sampler)
    p.add_argument("--steps", type=at_least_1, help="its steps (default: the generator's)")
    condition = (
        "what a digit task is described by: 'dataset' (support-set features, the default) or "
        "'text' (its class names in label order, hashed character n-grams; no novel split)"
    )
    p.add_argument("--condition", choices=("dataset", "text"), default="dataset", help=condition)
    model = (
        "what the digits demo generates: 'head' (a linear head on a frozen backbone, the "
        "default), 'mlp' or 'cnn' (every layer of a small network on the pixels)"
    )
    p.add_argument("--model", choices=("head", "mlp", "cnn"), default="head", help=model)
    window = "tokens per generator window (default: the demo's, 0 = a model is one window)"
    p.add_argument("--window", type=at_least_0, help=window)

    p = _command(
        sub,
        "train",
        cmd_train,
        "train a generator on a zoo directory",
        "d2nwg train --zoo my_zoo --config gen.json --out run",
        "(the generator lands in run/generator, checkpoints in run/checkpoints)",
    )
    p.add_argument("--zoo", required=True, help="a directory written by ModelZoo.save")
    p.add_argument("--config", help="a JSON file of D2NWGConfig fields (default: all defaults)")
    p.add_argument("--out", required=True)
    resume = (
        "continue from the newest checkpoint in --out; '--resume auto': the same, or start "
        "fresh when there is none (one command line for the first start and every restart "
        "under torchrun --max-restarts)"
    )
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   type=_resume, help=resume)  # fmt: skip
    p.add_argument("--no-progress", action="store_true")

    p = _command(
        sub,
        "generate",
        cmd_generate,
        "sample weights from a trained generator",
        "d2nwg generate --generator run/generator --condition task.safetensors --num 8 --seed 0 "
        "--out samples",
        "d2nwg generate --generator run/generator --shards --shard-size 2048 --out model",
        "d2nwg generate --generator run/generator --peft --num 4 --out adapters",
        "(the condition file holds one tensor named 'condition'; omit it for an unconditional "
        "generator)",
    )
    p.add_argument("--generator", required=True, help="a directory written by D2NWG.save")
    p.add_argument("--condition", help="a safetensors file with a tensor named 'condition'")
    p.add_argument("--num", type=at_least_1, default=1)
    p.add_argument("--seed", type=at_least_0, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--sampler", choices=d2nwg.SAMPLERS)
    p.add_argument("--steps", type=at_least_1)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--base", help="the base model (safetensors) of a delta generator")
    shards = "stream one model into safetensors shards with an index (Hugging Face layout)"
    p.add_argument("--shards", action="store_true", help=shards)
    shard_size = "MiB per shard (default 2048)"
    p.add_argument("--shard-size", type=at_least_1, default=2048, help=shard_size)
    p.add_argument("--batch-windows", type=at_least_1, help="windows per sampler run")
    peft = (
        "write one PEFT adapter folder per sample (OUT/sample_00000/...: "
        "adapter_model.safetensors and the adapter_config.json the generator kept from its "
        "zoo of adapters), which PeftModel.from_pretrained loads"
    )
    p.add_argument("--peft", action="store_true", help=peft)

    p = _command(sub, "bench", cmd_bench, "CPU microbenchmarks, or --suite for bench/gpu_suite.py")
    p.add_argument("--suite", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (d2nwg.D2NWGError, OSError) as exc:  # OSError: e.g. an unwritable output folder
        print(f"d2nwg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
