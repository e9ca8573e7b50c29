"""Test helpers shared by d2nwg's test files (and usable by downstream projects)."""

from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| computed in float64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close_lowp(
    out: torch.Tensor,
    ref: torch.Tensor,
    torch_out: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """Low-precision rule: the kernel's error is at most ``factor`` times PyTorch's own error.

    ``ref`` is a high-precision reference (fp32 or better, fp64 preferred) computed from the
    same (already rounded) inputs; ``torch_out`` is what plain PyTorch returns in the low
    precision dtype being tested. With ``e_k = max|out - ref|`` and ``e_t = max|torch_out - ref|``
    the check is ``e_k <= factor * e_t + atol``. The small absolute floor covers cases where
    PyTorch happens to be (nearly) exact; by default it is ``1e-5`` plus one rounding of the
    largest reference value into ``out.dtype`` (``eps/2 * max|ref|``), the ulp-level noise that
    any implementation storing its result in that dtype may show. Shapes must match and
    ``out`` must be finite.
    """
    if out.shape != ref.shape or torch_out.shape != ref.shape:
        raise AssertionError(
            f"{name}: shapes differ: out {tuple(out.shape)}, ref "
            f"{tuple(ref.shape)}, torch_out {tuple(torch_out.shape)}"
        )
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: kernel output has non-finite values")
    if atol is None:
        scale = ref.detach().abs().max().item() if ref.numel() else 0.0
        atol = 1e-5 + 0.5 * torch.finfo(out.dtype).eps * scale
    e_k = max_abs_err(out, ref)
    e_t = max_abs_err(torch_out, ref)
    bound = factor * e_t + atol
    if not e_k <= bound:
        raise AssertionError(
            f"{name}: kernel error {e_k:.3e} exceeds {factor} x PyTorch's "
            f"error {e_t:.3e} + {atol:.2e} (= {bound:.3e}) in {out.dtype}"
        )
