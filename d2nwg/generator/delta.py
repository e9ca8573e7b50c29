"""Delta generation: a generator with ``D2NWGConfig(delta=True)`` learns the residuals
``model - base`` and writes ``base + generated``. :class:`Base` is the one place a base model is
checked, subtracted and added back."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from d2nwg.errors import ConfigError
from d2nwg.tokenizer import WeightTokenizer


class Base:
    """A delta generator's base: its tensors that the tokenizer's layout covers, on CPU,
    checked by name, shape and dtype."""

    def __init__(self, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
        self.tensors = tensors  # by name, tied copies included
        self.names = names  # the layout's tensors, each once (tied copies share its memory)

    @classmethod
    def of(
        cls,
        delta: bool,
        tokenizer: WeightTokenizer,
        base: Mapping[str, torch.Tensor] | nn.Module | None,
    ) -> Base | None:
        """The base of a delta generator (required); None without delta (and none allowed)."""
        if not delta:
            if base is not None:
                raise ConfigError(
                    "base= is for D2NWGConfig(delta=True); this generator has delta=False"
                )
            return None
        if base is None:
            raise ConfigError("this generator has delta=True: pass base= (the base state dict)")
        if isinstance(base, nn.Module):
            base = base.state_dict()
        tensors = {k: v.detach().cpu() for k, v in tokenizer.destinations(base).items()}
        return cls(tensors, [spec.name for spec in tokenizer.layers])

    def residual(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the generator learns of a zoo model: ``model - base``."""
        return {k: (v - self.tensors[k].to(v)) if k in self.tensors else v for k, v in sd.items()}

    def add_to(self, sd: dict[str, torch.Tensor]) -> None:
        """``sd += base``, in place, for every tensor of the layout (once per tied group)."""
        for name in self.names:
            sd[name].add_(self.tensors[name].to(sd[name]))

    def copy(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A fresh copy of one base tensor, to accumulate generated residuals into."""
        return self.tensors[name].to(device, dtype, copy=True)
