"""Backend selection for d2nwg's ops (the xformers "not supported reasons" pattern).

Every op lists its backends in order of preference. Each backend says, for the given inputs,
why it cannot run (a string) or that it can (None). Dispatch picks the first that can; a
forced backend (the ``backend=`` keyword, or the ``D2NWG_BACKEND`` environment variable) runs
or fails with every backend's reason listed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from d2nwg.errors import BackendUnavailableError, ConfigError

ENV_VAR = "D2NWG_BACKEND"
BACKEND_NAMES = ("torch", "cpp", "cuda", "triton", "xformers")


@dataclass(frozen=True)
class Backend:
    """One implementation of an op: ``why_not(*inputs)`` returns None when it can run."""

    name: str
    run: Callable
    why_not: Callable[..., str | None]


def triton_reason(tensors: Iterable[torch.Tensor]) -> str | None:
    """Why Triton kernels cannot run on these tensors, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    devices = {t.device.type for t in tensors}
    if devices - {"cuda", "cpu"}:
        return f"triton runs on CUDA tensors, got {sorted(devices)}"
    if "cpu" in devices and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if "cpu" in devices and "cuda" in devices:
        return "tensors are on both CPU and CUDA"
    return None


def compiled_reason(device_type: str, *ops: str) -> Callable[..., str | None]:
    """The ``why_not`` of a compiled (csrc/) backend: it runs on ``device_type`` tensors (the
    first input) when d2nwg._C can run there and registered every op in ``ops``."""

    def why_not(x: torch.Tensor, *_) -> str | None:
        from d2nwg import _ext

        if x.device.type != device_type:
            return f"needs {device_type.upper()} tensors, got {x.device.type}"
        reason = _ext.cuda_reason(x.device.index) if device_type == "cuda" else _ext.cpp_reason()
        missing = [op for op in ops if not hasattr(torch.ops.d2nwg, op)]
        if reason is None and missing:
            return f"d2nwg._C was built without {', '.join(missing)} (rebuild it)"
        return reason

    return why_not


def launch_device(t: torch.Tensor):
    """Triton launches on the current CUDA device, not on its arguments': make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def requested_backend(backend: str | None) -> tuple[str | None, bool]:
    """The forced backend and whether it was forced by keyword (strict) or env (lenient)."""
    if backend is not None:
        return backend, True
    env = os.environ.get(ENV_VAR, "").strip()
    return (env or None), False


def select(op: str, backends: Sequence[Backend], *inputs, backend: str | None = None) -> Backend:
    """Pick the backend that runs ``op`` on ``inputs``.

    A ``backend=`` keyword is strict: it runs or raises. ``D2NWG_BACKEND`` is applied to the
    ops that implement that backend and ignored by the others (an attention op has no C++
    backend, for example), so one variable can steer a whole program.
    """
    forced, strict = requested_backend(backend)
    names = [b.name for b in backends]
    if forced is not None and forced not in BACKEND_NAMES:
        raise ConfigError(f"unknown backend {forced!r} for {op}; choose from {names}")
    if forced is not None and forced not in names:
        if strict:
            raise BackendUnavailableError(f"{op} has no {forced!r} backend; it has {names}")
        forced = None
    on_cpu = any(t.device.type == "cpu" for t in _tensors(inputs))
    reasons: dict[str, str] = {}
    for b in backends:
        if forced is not None and b.name != forced:
            continue
        if forced is None and b.name == "triton" and on_cpu:
            reasons[b.name] = (
                "the Triton interpreter is for tests; force backend='triton' to use it"
            )
            continue
        reason = b.why_not(*inputs)
        if reason is None:
            return b
        reasons[b.name] = reason
    if forced is not None:  # list every backend's reason, not just the forced one's
        reasons = {b.name: (b.why_not(*inputs) or "can run") for b in backends}
    lines = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
    head = f"backend {forced!r} cannot run {op}" if forced else f"no backend can run {op}"
    raise BackendUnavailableError(f"{head}:\n{lines}")


def _tensors(inputs) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            found.extend(_tensors(x))
    return found


def device_reasons(device: torch.device) -> dict[str, str | None]:
    """Why each backend can (None) or cannot run on ``device``, for any op that has it
    (``d2nwg info``; an op's own ``why_not`` may add reasons of its inputs)."""
    from d2nwg import _ext

    device = torch.device(device)
    found: dict[str, str | None] = {"torch": None}
    found["cpp"] = _ext.cpp_reason() if device.type == "cpu" else "runs on CPU tensors"
    found["cuda"] = (
        _ext.cuda_reason(device.index)
        if device.type == "cuda"
        else _ext.cuda_reason() or "runs on CUDA tensors"
    )
    found["triton"] = triton_reason([torch.empty(1, device=device)])
    try:
        import xformers  # noqa: F401

        found["xformers"] = None if device.type == "cuda" else "runs on CUDA tensors"
    except ImportError:
        found["xformers"] = "xformers is not installed (pip install d2nwg[xformers])"
    return found
