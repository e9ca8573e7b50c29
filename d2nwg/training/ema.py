"""An exponential moving average of a module's weights: what the generator samples with."""

from __future__ import annotations

from typing import Any

import torch

from d2nwg.errors import ConfigError


def ema_decay(decay: float, num_updates: int) -> float:
    """The decay of update number ``num_updates`` (1-based): ``min(decay, (1 + k) / (10 + k))``,
    a warm-up so that a short run is not dominated by its random initialization."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """Exponential moving average of a module's floating parameters and buffers:
    ``shadow <- d * shadow + (1 - d) * weights`` with ``d = ema_decay(decay, k)``."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = ema_decay(self.decay, self.num_updates)
        state = module.state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[k] for k in names], [state[k].detach() for k in names], 1.0 - d
        )

    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (non-floating buffers are left as they are)."""
        module.load_state_dict(self.shadow, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
