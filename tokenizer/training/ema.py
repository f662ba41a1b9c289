"""Exponential moving average of a model's weights (optional; the release trains without one)."""

from __future__ import annotations

import torch
from torch import nn


class ModelEma:
    """Shadow copies of every floating-point parameter and buffer: ``ema = decay * ema + (1 - decay) * w``.

    Integer buffers are copied as they are. ``state_dict`` has the keys of ``model.state_dict()``, so the
    EMA weights load straight into a fresh model of the same config.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"expected an EMA decay in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Move the shadow weights towards ``model``'s current weights.

        ``skip``: a 0-dim tensor on the weights' device; where it is 1 the floating-point shadows stay as
        they are (a step the optimiser skipped), decided on the device without a host read.
        """
        current = model.state_dict()
        rate = 1.0 - self.decay if skip is None else (1.0 - self.decay) * (1.0 - skip)
        for name, value in self.shadow.items():
            if value.is_floating_point():
                value.lerp_(current[name].detach(), rate)
            else:
                value.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights (a model ``state_dict``)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadow weights saved by ``state_dict``; keys and shapes must match."""
        if set(state) != set(self.shadow):
            raise ValueError(
                f"EMA state keys differ from the model's: missing {sorted(set(self.shadow) - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - set(self.shadow))[:5]}"
            )
        for name, value in state.items():
            self.shadow[name].copy_(value)
