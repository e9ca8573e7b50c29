"""Build d2nwg and its extension d2nwg._C (C++ CPU ops always, CUDA ops when asked or possible).

Environment:
  FORCE_CUDA=1              build the CUDA ops even without a visible GPU
  TORCH_CUDA_ARCH_LIST=...  GPU targets (e.g. "8.0;9.0"); also turns the CUDA build on
  D2NWG_NO_CUDA=1           skip the CUDA part (fast local rebuilds)
  D2NWG_NO_EXT=1            pure-Python install (torch and Triton backends only)
  CUDA_HOME                 the toolkit; found from `nvcc --dryrun` when unset
  MAX_JOBS                  parallel compile jobs; capped by memory when unset
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def read_version() -> str:
    text = open(os.path.join(ROOT, "d2nwg", "version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def find_cuda_home() -> str | None:
    """The real toolkit: CUDA_HOME, else the TOP= that `nvcc --dryrun` prints.

    torch guesses from the nvcc on PATH, which is wrong when that nvcc is a wrapper script.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    with tempfile.TemporaryDirectory() as tmp:
        cu = os.path.join(tmp, "probe.cu")
        open(cu, "w").write("__global__ void k() {}\n")
        res = subprocess.run(
            [nvcc, "--dryrun", "-c", cu, "-o", os.path.join(tmp, "p.o")],
            capture_output=True,
            text=True,
        )
    m = re.search(r"TOP=(\S+)", res.stdout + res.stderr)
    return (
        os.path.realpath(m.group(1))
        if m
        else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    )


def cap_max_jobs() -> None:
    """nvcc takes ~1.5 GB per job on heavy torch headers: cap jobs by memory and cores."""
    if os.environ.get("MAX_JOBS"):
        return
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 1.5))))


def want_cuda(torch) -> tuple[bool, str]:
    if os.environ.get("D2NWG_NO_CUDA") == "1":
        return False, "D2NWG_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if find_cuda_home() is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if (
        torch.cuda.is_available()
        or os.environ.get("FORCE_CUDA") == "1"
        or os.environ.get("TORCH_CUDA_ARCH_LIST")
    ):
        return True, "enabled"
    return False, "no GPU visible (set FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST)"


def extensions():
    if os.environ.get("D2NWG_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cap_max_jobs()
    cuda, why = want_cuda(torch)
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    # No -std: torch adds the standard its headers need (C++17 up to 2.12, C++20 after).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    define = [("TORCH_EXTENSION_NAME", "_C")]
    if not cuda:
        print(f"d2nwg: building the C++ CPU ops only ({why})")
        ext = cpp_extension.CppExtension(
            "d2nwg._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
            define_macros=define,
        )
        return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch read its guess at import time
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(
        f"{major}.{minor}"
        for major, minor in {
            torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        }
    )
    print(f"d2nwg: building C++ and CUDA ops for {archs} with the toolkit in {cuda_home}")
    nvcc = ["-O3", "--fmad=false", "--expt-relaxed-constexpr", "-lineinfo"]
    define += [("D2NWG_WITH_CUDA", "1"), ("D2NWG_CUDA_ARCHS", f'"{archs}"')]
    ext = cpp_extension.CUDAExtension(
        "d2nwg._C",
        cpp_sources + sorted(glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": cxx + ["-fopenmp"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
        define_macros=define,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="d2nwg",
    version=read_version(),
    description="Diffusion-based neural-network weight generation with fused Triton/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as d2nwg.kernels, never as a top-level `kernels` package.
    # every package under d2nwg/ (a new one cannot be forgotten), and kernels/ as d2nwg.kernels
    packages=[f"d2nwg.{p}" for p in find_packages("d2nwg")] + ["d2nwg", "d2nwg.kernels"],
    package_dir={"d2nwg": "d2nwg", "d2nwg.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "safetensors", "tqdm"],  # what d2nwg imports
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.0", "diffusers"],
        "demo": ["scikit-learn", "matplotlib"],
        "xformers": ["xformers"],
        "plot": ["matplotlib"],
        # Hugging Face: PEFT adapter folders, transformers models as targets (d2nwg.hf)
        "hf": ["transformers", "peft"],
    },
    entry_points={"console_scripts": ["d2nwg = d2nwg.cli:main"]},
)
