"""The compiled extension ``d2nwg._C``, if it was built, and what it was built with."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

IMPORT_ERROR: str | None = None
if importlib.util.find_spec("d2nwg._C") is None:  # not built: torch and Triton still work
    _C = None
    IMPORT_ERROR = "d2nwg._C is not built (run `make build`, or reinstall d2nwg with a compiler)"
else:
    try:  # importing registers the C++/CUDA ops under torch.ops.d2nwg
        _C = importlib.import_module("d2nwg._C")
    except ImportError as exc:  # e.g. built against another torch
        _C = None
        IMPORT_ERROR = f"d2nwg._C failed to import ({exc}); rebuild it for this torch"


@functools.cache
def build_info() -> dict[str, Any]:
    """What the extension was compiled with: {"with_cuda", "cuda_archs", "torch"}."""
    if _C is None:
        return {"with_cuda": False, "cuda_archs": [], "torch": None}
    info = dict(_C.build_info())
    info["cuda_archs"] = [a for a in str(info.get("cuda_archs", "")).split(";") if a]
    return info


def cpp_reason() -> str | None:
    """Why the C++ CPU ops cannot run, or None."""
    return IMPORT_ERROR


def cuda_reason(device_index: int | None = None) -> str | None:
    """Why the CUDA ops cannot run on this device, or None."""
    if _C is None:
        return IMPORT_ERROR
    info = build_info()
    if not info["with_cuda"]:
        return (
            "d2nwg._C was built without CUDA (set FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST and rebuild)"
        )
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    major, minor = torch.cuda.get_device_capability(device_index)
    compiled = info["cuda_archs"]
    # Machine code for sm_XY runs on compute capability X.Z with Z >= Y; +PTX JITs forward.
    for arch in compiled:
        num = arch.replace("+PTX", "").replace("a", "")
        a_major, _, a_minor = num.partition(".")
        if not a_major.isdigit() or not a_minor.isdigit():
            continue
        same_major = int(a_major) == major and int(a_minor) <= minor
        ptx_forward = arch.endswith("+PTX") and (int(a_major), int(a_minor)) <= (major, minor)
        if same_major or ptx_forward:
            return None
    return (
        f"d2nwg._C has no code for compute capability {major}.{minor} "
        f"(compiled for {';'.join(compiled)})"
    )


FATBIN_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little-endian


@functools.cache
def machine_code_archs() -> list[str]:
    """The GPU code really inside d2nwg._C, read from its fat binaries: ["sm_80", "ptx_90"].

    Parses the CUDA fatbin headers (header: magic, version, header size, payload size;
    each entry: kind 1 = PTX / 2 = ELF, header size, payload size, and the arch at byte 28),
    so `d2nwg info` reports what was compiled, not what was asked for.
    """
    import struct

    if _C is None or not getattr(_C, "__file__", None):
        return []
    data = open(_C.__file__, "rb").read()
    found: set[tuple[str, int]] = set()
    pos = data.find(FATBIN_MAGIC)
    while pos != -1 and pos + 16 <= len(data):
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= min(end, len(data)):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if entry_header == 0:
                break
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            found.add(("ptx" if kind == 1 else "sm", arch))
            entry += entry_header + payload
        pos = data.find(FATBIN_MAGIC, max(end, pos + 4))
    return [f"{kind}_{arch}" for kind, arch in sorted(found, key=lambda k: (k[1], k[0]))]
