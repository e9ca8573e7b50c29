"""Ahead-of-time compilation of d2nwg's Triton kernels for real GPU targets, without a GPU.

Used by ``tests/test_triton_gpu_compile.py``, which runs this file as a script in a subprocess
with ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` returns an
``InterpretedFunction`` that cannot be compiled). Also runnable by hand, e.g. against another
Triton (``PYTHONPATH=/tmp/triton36 python tests/gpu_compile_cases.py``)::

    python tests/gpu_compile_cases.py [--out results.json] [--jobs N] [--filter SUBSTRING] [--list]

Each case is one kernel x one constexpr configuration x one target (sm_80 / sm_90). The
configurations are the ones the launchers pick on a GPU: block sizes, warps and stages come
from the launchers' own functions and constants (``_fwd_config``, ``_bwd_config``, ``tile``,
``BLOCK_GPU``...), evaluated here with the interpreter off. Runtime arguments are specialized
as Triton's JIT specializes them at a launch (pointers 16-byte aligned -> ``tt.divisibility``,
integers divisible by 16 likewise, an integer equal to 1 becomes a constexpr).

``cases()`` only enumerates (it imports constants, so it works under the interpreter too);
``compile_case()`` needs the real ``triton.jit`` kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

SS_OPS = "d2nwg.ops.sampler_step_op"
ARCHS = (80, 90)
# Largest dynamic shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}

_DT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _DT[name])


def _dt_name(dtype) -> str:
    return {v: k for k, v in _DT.items()}[str(dtype).replace("torch.", "")]


# ----------------------------------------------------------------------------------------
# Enumeration (plain data; ids are stable test ids).
# ----------------------------------------------------------------------------------------
def cases() -> list[dict]:
    """Every (kernel, configuration, arch) to compile.

    Chosen to fit in about a minute on two cores: on sm_90 (the lent GPU machines are
    H100/H200) every dtype pair / mode the launchers produce, where that is cheap; on sm_80
    (less shared memory) every dtype in every role and every attention head dim x block
    configuration.
    """
    import importlib

    # (d2nwg.ops re-exports functions of these names: import the modules themselves.)
    la_ops = importlib.import_module("d2nwg.ops.latent_attention_op")
    ss_ops = importlib.import_module(SS_OPS)
    tk_ops = importlib.import_module("d2nwg.ops.tokenize_op")

    out: list[dict] = []

    # Tokenize / detokenize: the token dtype is a pointer type, the weight dtype (sources of
    # tokenize, destinations of detokenize) a constexpr; the launchers can produce every pair,
    # with 16-byte aligned addresses (ALIGNED: vector accesses) or not.
    dts = [_dt_name(d) for d in tk_ops.FLOAT_DTYPES]
    n = len(dts)
    tok_plan = {  # arch -> [(token dtype, weight dtype, aligned)]
        90: [(t, w, True) for t in dts for w in dts]
        + [(dts[i], dts[(i + 1) % n], False) for i in range(n)],
        80: [(dts[i], dts[(i + 1) % n], True) for i in range(n)]
        + [(dts[i], dts[(i + 2) % n], False) for i in range(n)],
    }
    for arch in ARCHS:
        for kernel in ("tokenize", "detokenize"):
            for tok, w, aligned in tok_plan[arch]:
                out.append(dict(kernel=kernel, arch=arch, tok=tok, w=w, aligned=aligned))

    # Latent attention, forward and backward, for every head dim x dtype the op sends to
    # Triton. Code paths: "mask" (key-padding mask, bounds checks) and "full" (no mask,
    # lengths multiples of the blocks: unmasked loads). fp32 runs IEEE dot products unless
    # TF32 is allowed ("tf32"). Compile time rules the choice:
    # - bf16 and fp16 share block sizes, so shared memory and registers (same element size):
    #   on sm_80 bf16 stands for both; on sm_90 (MMA v3 for both) each dtype, one path each.
    # - IEEE fp32 dots lower to FMAs on both archs (no tensor cores, little that differs) and
    #   are the slowest to compile (up to 10 s for D = 128): every head dim on sm_80, the small
    #   ones on sm_90.
    # - TF32 is opt-in: the largest head dim (most shared memory) on sm_90.
    dims = tuple(la_ops.TRITON_HEAD_DIMS)
    small = dims[: len(dims) // 2]
    attn_plan = {  # arch -> [(dtype, dot precision, code path, head dims)]
        80: [("fp32", "ieee", "mask", dims), ("bf16", "tf32", "mask", dims)],
        90: [
            ("fp32", "ieee", "full", small),
            ("bf16", "tf32", "full", dims),
            ("fp16", "tf32", "mask", dims),
            ("fp32", "tf32", "mask", dims[-1:]),
        ],
    }
    attn_dtypes = {_dt_name(x) for x in la_ops.DTYPES}
    assert {dt for dt, *_ in attn_plan[90]} == attn_dtypes, "a dtype is not covered"
    for arch in ARCHS:
        for dt, prec, variant, head_dims in attn_plan[arch]:
            for d in head_dims:
                for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
                    out.append(
                        dict(
                            kernel=kernel, arch=arch, d=d, dtype=dt, variant=variant, precision=prec
                        )
                    )
        for d in dims:  # the tiny rowsum(dO * O) kernel: every dtype, the extreme head dims
            for dt in sorted(attn_dtypes):
                if d in (min(dims), max(dims)) and (arch == 90 or d == max(dims)):
                    out.append(dict(kernel="attn_bwd_preprocess", arch=arch, d=d, dtype=dt))

    # Sampler step: x dtype (pointer types; ACC is float64 for float64 x) x table dtype x mode
    # (guided; noise for DDPM / DDIM eta > 0; the previous x0 for DPM-Solver++(2M); the two
    # previous x0 for DPM-Solver++(3M) and UniPC) x tile (BLOCK_B x BLOCK_N from ``tile``:
    # long rows, short rows, one-element rows).
    xs = [_dt_name(d) for d in ss_ops.X_DTYPES]
    tabs = [_dt_name(d) for d in ss_ops.TABLE_DTYPES]
    modes = [(g, e) for g in (False, True) for e in ("none", "noise", "prev", "prev2")]
    big, short, single = (64, 100_000), (8, 50), (1000, 1)

    def sample_table(x):  # the table d2nwg.sample builds
        return "fp64" if x == "fp64" else "fp32"

    ss_plan = {  # arch -> [(x, table, guided, extra input, (B, N))]
        90: [(x, sample_table(x), g, e, big) for x in xs for g, e in modes]
        + [("fp32", "fp64", True, "prev", big), ("fp64", "fp32", False, "noise", big)]
        + [("fp32", "fp32", True, "noise", short), ("fp64", "fp64", True, "noise", single)]
        + [("bf16", "fp32", False, "prev2", short)],
        80: [
            (x, sample_table(x), g, e, big)
            for x in xs
            for g, e in ((False, "noise"), (True, "prev"), (False, "prev2"))
        ]
        + [("bf16", "fp32", True, "prev", short), ("fp16", "fp32", True, "none", single)],
    }
    for arch in ARCHS:
        for x, tab, guided, extra, (B, N) in ss_plan[arch]:
            assert tab in tabs
            out.append(
                dict(
                    kernel="sampler_step",
                    arch=arch,
                    x=x,
                    table=tab,
                    guided=guided,
                    extra=extra,
                    B=B,
                    N=N,
                )
            )
    for c in out:
        c["id"] = case_id(c)
    assert len({c["id"] for c in out}) == len(out), "duplicate case ids"
    return out


def case_id(c: dict) -> str:
    k = c["kernel"]
    if k in ("tokenize", "detokenize"):
        rest = f"tok_{c['tok']}-w_{c['w']}-{'aligned' if c['aligned'] else 'unaligned'}"
    elif k == "attn_bwd_preprocess":
        rest = f"{c['dtype']}-d{c['d']}"
    elif k.startswith("attn"):
        rest = f"{c['dtype']}-d{c['d']}-{c['variant']}" + (
            f"-{c['precision']}" if c["dtype"] == "fp32" else ""
        )
    else:
        mode = ("guided" if c["guided"] else "plain") + "-" + c["extra"]
        rest = f"x_{c['x']}-tab_{c['table']}-{mode}-B{c['B']}xN{c['N']}"
    return f"{k}-{rest}-sm{c['arch']}"


# ----------------------------------------------------------------------------------------
# Specialization and compilation.
# ----------------------------------------------------------------------------------------
class Ptr:
    """A tensor argument: its element type and whether its address is 16-byte aligned."""

    def __init__(self, ty: str, aligned: bool = True):
        self.ty, self.aligned = ty, aligned


def _specialize(v, path: tuple, what: str, consts: dict, attrs: dict):
    """The signature type of the runtime value ``v`` at argument path ``path`` (``(i,)``, or
    ``(i, j)`` for element j of a tuple argument i), specialized as the JIT specializes a launch;
    fills ``consts`` and ``attrs`` at that path."""
    divisible = False
    if isinstance(v, tuple):  # each element is specialized as a scalar argument would be
        return tuple(_specialize(x, path + (j,), what, consts, attrs) for j, x in enumerate(v))
    if isinstance(v, Ptr):
        ty = "*" + v.ty
        divisible = v.aligned
    elif isinstance(v, bool):
        ty = "u1"
    elif isinstance(v, int):
        if v == 1:  # the JIT turns an integer argument equal to 1 into a constexpr
            consts[path] = 1
            return "constexpr"
        ty = "i32" if -(2**31) <= v < 2**31 else "i64"
        divisible = v % 16 == 0
    elif isinstance(v, float):
        ty = "fp32"
    else:
        raise TypeError(f"{what}={v!r} of unsupported type")
    if divisible:
        attrs[path] = [["tt.divisibility", 16]]
    return ty


def build_source(fn, args: dict, constexprs: dict):
    """``triton.compiler.ASTSource`` for ``fn`` launched with ``args`` (runtime values: ``Ptr``,
    int, float, or a tuple of those) and ``constexprs``, specialized as the JIT specializes a
    launch. The format (signature: every argument name -> type string such as "*bf16", "i32",
    "fp32", or "constexpr", a tuple of them for a tuple argument; constexprs and attrs keyed
    by argument paths: ``(i,)``, ``(i, j)`` inside a tuple) is the one Triton 3.6 and 3.8 both
    accept (checked with both)."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    missing = set(names) - set(args) - set(constexprs)
    extra = (set(args) | set(constexprs)) - set(names)
    if missing or extra:
        raise TypeError(
            f"{fn.__name__}: missing arguments {sorted(missing)}, unknown {sorted(extra)}"
        )
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[(i,)] = constexprs[name]
        else:
            signature[name] = _specialize(
                args[name], (i,), f"{fn.__name__}: argument {name}", consts, attrs
            )
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _tokenize_job(c: dict):
    from d2nwg.kernels import tokenize as tk

    w = tk._TL_DTYPE[_torch_dtype(c["w"])]
    common = dict(ALIGNED=c["aligned"], BLOCK=tk.BLOCK_GPU)
    if c["kernel"] == "tokenize":
        fn = tk._tokenize_kernel
        args = dict(
            out_ptr=Ptr(c["tok"]),
            src_addr_ptr=Ptr("i64"),
            item_of_block_ptr=Ptr("i32"),
            first_block_ptr=Ptr("i32"),
            dst_ptr=Ptr("i64"),
            numel_ptr=Ptr("i64"),
            span_ptr=Ptr("i64"),
            shift_ptr=Ptr("fp64"),
            rscale_ptr=Ptr("fp64"),
        )
        consts = dict(SRC=w, **common)
    else:
        fn = tk._detokenize_kernel
        args = dict(
            tok_ptr=Ptr(c["tok"]),
            dst_addr_ptr=Ptr("i64"),
            item_of_block_ptr=Ptr("i32"),
            first_block_ptr=Ptr("i32"),
            src_ptr=Ptr("i64"),
            numel_ptr=Ptr("i64"),
            scale_ptr=Ptr("fp64"),
            shift_ptr=Ptr("fp64"),
        )
        consts = dict(DST=w, **common)
    return fn, args, consts, dict(num_warps=tk.NUM_WARPS, enable_fp_fusion=False)


def _attention_job(c: dict):
    from d2nwg.kernels import latent_attention as la

    assert not la._interpreted()
    dt, D = c["dtype"], c["d"]
    dtype = _torch_dtype(dt)
    # Shapes of a typical call: H=4 heads (any batch); q/k/v contiguous [B, H, L, D], outputs
    # laid out [B, L, H, D] as the launcher allocates them. "full": no mask, lengths multiples
    # of the blocks; "ragged": no mask, odd lengths; "mask": a key-padding mask, odd lengths.
    H = 4
    variant = c.get("variant", "ragged")
    has_mask = variant == "mask"
    LQ = LK = 256 if variant == "full" else 250

    # The kernels take each tensor's (batch, head, row) strides as one tuple argument.
    def bhld(L):  # strides (b, h, l) of a contiguous [B, H, L, D]
        return H * L * D, L * D, D

    def blhd(L):  # strides (b, h, l) of [B, L, H, D] memory seen as [B, H, L, D]
        return L * H * D, D, H * D

    if c["kernel"] == "attn_bwd_preprocess":
        fn = la._attn_bwd_preprocess
        args = dict(
            O=Ptr(dt),
            DO=Ptr(dt),
            DELTA=Ptr("fp32"),
            stride_o=blhd(LQ),
            stride_do=blhd(LQ),
            H=H,
            LQ=LQ,
        )
        return fn, args, dict(HEAD_DIM=D, BLOCK_M=64), {}
    # Under the interpreter the launcher uses other blocks: this runs with it off.
    cfg = dict(la._fwd_config(D, dtype) if c["kernel"] == "attn_fwd" else la._bwd_config(D, dtype))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    precision = c["precision"]
    if dt != "fp32":
        assert precision == la._precision(dtype), (precision, la._precision(dtype))
    mask = Ptr("u8") if has_mask else Ptr(dt)  # without a mask the launcher passes q
    stride_mb = LK if has_mask else 0
    consts = dict(
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_MASK=has_mask,
        PRECISION=precision,
        UPCAST=la._upcast(dtype),
    )
    qkv = dict(stride_q=bhld(LQ), stride_k=bhld(LK), stride_v=bhld(LK))
    if c["kernel"] == "attn_fwd":
        fn = la._attn_fwd_kernel
        args = dict(
            Q=Ptr(dt),
            K=Ptr(dt),
            V=Ptr(dt),
            O=Ptr(dt),
            LSE=Ptr("fp32"),
            MASK=mask,
            **qkv,
            stride_o=blhd(LQ),
            stride_maskb=stride_mb,
            H=H,
            LQ=LQ,
            LK=LK,
            qk_scale=D**-0.5 * la.LOG2E,
        )
        consts["FULL_N"] = not has_mask and LK % block_n == 0
    else:
        common = dict(
            Q=Ptr(dt),
            K=Ptr(dt),
            V=Ptr(dt),
            DO=Ptr(dt),
            LSE=Ptr("fp32"),
            DELTA=Ptr("fp32"),
            MASK=mask,
            **qkv,
            stride_do=blhd(LQ),
            stride_maskb=stride_mb,
            H=H,
            LQ=LQ,
            LK=LK,
            qk_scale=D**-0.5 * la.LOG2E,
            sm_scale=D**-0.5,
        )
        if c["kernel"] == "attn_bwd_dkdv":
            fn = la._attn_bwd_dkdv_kernel
            args = dict(common, DK=Ptr(dt), DV=Ptr(dt), stride_dk=blhd(LK), stride_dv=blhd(LK))
            consts["FULL_M"] = LQ % block_m == 0
        else:
            fn = la._attn_bwd_dq_kernel
            args = dict(common, DQ=Ptr(dt), stride_dq=blhd(LQ))
            consts["FULL_N"] = not has_mask and LK % block_n == 0
    return fn, args, consts, cfg


def _sampler_job(c: dict):
    import triton
    import triton.language as tl

    from d2nwg.kernels import sampler_step as ss
    from d2nwg.ops.sampler_step_op import K

    B, N, x = c["B"], c["N"], c["x"]
    block_b, block_n = ss.tile(B, N, False)
    n_col_blocks = triton.cdiv(N, block_n)
    S = 50  # steps; the table d2nwg.sample builds is [S, K], shared by the samples (stride 0)
    args = dict(
        x_ptr=Ptr(x),
        out_ptr=Ptr(x),
        tab_ptr=Ptr(c["table"]),
        step_ptr=Ptr("i64"),
        z_ptr=Ptr(x),
        prev_ptr=Ptr(x),
        prev2_ptr=Ptr(x),
        B=B,
        N=N,
        n_col_blocks=n_col_blocks,
        num_steps=S,
        stride_ts=K,
        stride_tb=0,
    )
    consts = dict(
        GUIDED=c["guided"],
        HAS_NOISE=c["extra"] == "noise",
        HAS_PREV=c["extra"] in ("prev", "prev2"),
        HAS_PREV2=c["extra"] == "prev2",
        ACC=tl.float64 if x == "fp64" else tl.float32,
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        # the coefficient columns, as the launcher passes them
        **{f"COL_{n}": j for j, n in enumerate(importlib.import_module(SS_OPS).COLUMNS)},
    )
    return ss._sampler_step_kernel, args, consts, dict(num_warps=ss.NUM_WARPS)


_JOBS = {
    "tokenize": _tokenize_job,
    "detokenize": _tokenize_job,
    "attn_fwd": _attention_job,
    "attn_bwd_dkdv": _attention_job,
    "attn_bwd_dq": _attention_job,
    "attn_bwd_preprocess": _attention_job,
    "sampler_step": _sampler_job,
}
KERNEL_MODULES = (
    "d2nwg.kernels.tokenize",
    "d2nwg.kernels.latent_attention",
    "d2nwg.kernels.sampler_step",
)


def same_16bit_configs() -> bool:
    """Whether the attention launchers pick the same GPU blocks for bf16 and fp16 (the sm_80
    cases rely on it to let bf16 stand for fp16)."""
    import torch

    from d2nwg.kernels import latent_attention as la

    return all(
        f(d, torch.bfloat16) == f(d, torch.float16)
        for f in (la._fwd_config, la._bwd_config)
        for d in la.HEAD_DIMS
    )


def uncovered_kernels() -> list[str]:
    """``@triton.jit`` functions of the kernel modules that no case compiles, neither as a
    kernel nor as a device function called by one (a new kernel must get cases here)."""
    import importlib
    import inspect

    from triton.runtime.jit import JITFunction

    first = {}  # one case per kernel name
    for c in cases():
        first.setdefault(c["kernel"], c)
    covered = {}
    for c in first.values():
        fn = _JOBS[c["kernel"]](c)[0]
        covered[fn.__module__ + "." + fn.__name__] = fn
    sources = "\n".join(inspect.getsource(fn.fn) for fn in covered.values())
    missing = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__:
                if f"{name}.{attr}" in covered:
                    continue
                if re.search(rf"\b{re.escape(attr)}\(", sources):  # a device helper
                    continue
                missing.append(f"{name}.{attr}")
    return missing


_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame and local memory of the cubin (cuobjdump --dump-resource-usage)."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:
        tool = shutil.which("cuobjdump")
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    m = _RES_USAGE.search(res.stdout)
    if not m:
        return {}
    return dict(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))


def compile_case(c: dict) -> dict:
    """Compile one case; a JSON-able result (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    res = dict(id=c["id"], ok=False)
    try:
        fn, args, consts, options = _JOBS[c["kernel"]](c)
        res["constexprs"] = {k: str(v) for k, v in consts.items()}
        res["options"] = options
        src = build_source(fn, args, consts)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            kernel = triton.compile(src, target=GPUTarget("cuda", c["arch"], 32), options=options)
        cubin = kernel.asm.get("cubin", b"")
        res.update(
            ok=bool(cubin),
            cubin_bytes=len(cubin),
            shared=int(kernel.metadata.shared),
            num_warps=int(kernel.metadata.num_warps),
            num_stages=int(kernel.metadata.num_stages),
        )
        spill = _PTXAS_SPILL.search(log.getvalue())
        regs = _PTXAS_REGS.search(log.getvalue())
        if spill:
            res.update(
                stack_frame=int(spill[1]), spill_stores=int(spill[2]), spill_loads=int(spill[3])
            )
        if regs:
            res["regs"] = int(regs[1])
        usage = _resource_usage(cubin)
        res.update({k: v for k, v in usage.items() if k not in res})
        if not cubin:
            res["error"] = "no cubin produced"
    except BaseException as exc:  # noqa: BLE001 - reported, not raised
        res["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        res["traceback"] = traceback.format_exc()[-4000:]
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def _check_ptxas() -> str | None:
    """Point Triton at a working ptxas; None, or why none works."""
    candidates = []
    if os.environ.get("TRITON_PTXAS_PATH"):
        candidates.append(os.environ["TRITON_PTXAS_PATH"])
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        )
    except Exception as exc:  # noqa: BLE001
        return f"triton is not importable: {exc}"
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "ptxas"))
    if shutil.which("ptxas"):
        candidates.append(shutil.which("ptxas"))
    tried = []
    for path in candidates:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            tried.append(f"{path}: missing")
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except Exception as exc:  # noqa: BLE001
            tried.append(f"{path}: {exc}")
            continue
        if out.returncode == 0:
            os.environ["TRITON_PTXAS_PATH"] = path
            return None
        tried.append(f"{path}: exit {out.returncode} {out.stderr.strip()[:200]}")
    return "no working ptxas: " + "; ".join(tried)


def _isolated(c: dict) -> dict:
    """Compile one case in a process of its own: a compiler crash is pinned on that case."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as ex:
        try:
            return ex.submit(compile_case, c).result()
        except BrokenProcessPool as exc:
            return dict(id=c["id"], ok=False, error=f"the compiler process died: {exc}")


def _pool_compile(todo: list[dict], jobs: int) -> list[dict]:
    """Compile ``todo`` with ``jobs`` worker processes (forked: the kernels are imported)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if jobs <= 1:
        return [_isolated(c) for c in todo]
    # Longest first so that the workers finish together.
    weight = {"attn_fwd": 3, "attn_bwd_dkdv": 3, "attn_bwd_dq": 3}
    order = sorted(todo, key=lambda c: -weight.get(c["kernel"], 1))
    by_id = {}
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
        futures = {c["id"]: ex.submit(compile_case, c) for c in order}
        for c in order:
            try:
                by_id[c["id"]] = futures[c["id"]].result()
            except BrokenProcessPool:  # a worker crashed: redo the unfinished cases one by one
                break
    for c in order:
        if c["id"] not in by_id:
            by_id[c["id"]] = _isolated(c)
    return [by_id[c["id"]] for c in todo]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the JSON results here (default: stdout)")
    p.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("D2NWG_COMPILE_JOBS", min(4, os.cpu_count() or 1))),
    )
    p.add_argument("--filter", default="", help="only cases whose id contains this")
    p.add_argument("--list", action="store_true", help="print the case ids and exit")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr
        )
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    todo = [c for c in cases() if a.filter in c["id"]]
    if a.list:
        print("\n".join(c["id"] for c in todo))
        return 0
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
    t0 = time.perf_counter()
    report = dict(skip=_check_ptxas())
    import triton

    report.update(
        triton_version=triton.__version__,
        triton_file=triton.__file__,
        ptxas=os.environ.get("TRITON_PTXAS_PATH"),
        max_shared=MAX_SHARED,
    )
    if report["skip"] is None:
        report["uncovered"] = uncovered_kernels()
        report["same_16bit_configs"] = same_16bit_configs()
        report["results"] = _pool_compile(todo, a.jobs)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(report, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
