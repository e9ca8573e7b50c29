"""Test set-up: Triton kernels run on CPU under the interpreter when no GPU is visible."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates any kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded generator per test (fresh random inputs, reproducible failures)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
