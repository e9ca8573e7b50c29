"""Small helpers about tensors as memory, shared by the tokenizer and the zoo.

- :data:`StateDict`: names -> tensors, the one spelling of a state dict in d2nwg;
- :func:`storage_key`: which memory a tensor views (how tied weights are found);
- :func:`same_bits`: whether two tensors hold the same values bit for bit (what a tie keeps).

Nothing here reads a tensor's values but :func:`same_bits`; the rest works on meta tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# A state dict as d2nwg takes it: any mapping of names to tensors. Those it builds are dicts.
StateDict = Mapping[str, torch.Tensor]


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views. The storage is named by its StorageImpl, not its
    address: every meta tensor (and every empty storage) has address 0, so addresses would
    tie unrelated tensors of the same shape."""
    return (
        t.device,
        t.untyped_storage()._cdata,
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (NaN == NaN, -0.0 != +0.0): what a tie must hold."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    if storage_key(a) == storage_key(b):
        return True
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.to(a.device).view(bits))
