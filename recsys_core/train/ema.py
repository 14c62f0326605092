"""Exponential moving average of a model's trained weights (Polyak averaging), for validation and saving.

After optimiser step t the average moves towards the weights by ``1 - d_t``, with the warm-up decay
``d_t = min(decay, (1 + t) / (10 + t))`` (t counted from 0), so the first steps' average is not dominated
by the random initial weights:

    shadow <- d_t * shadow + (1 - d_t) * weights

Only parameters that train are averaged; buffers (cached text features, masks) are the model's own.
The epoch loop validates and saves with the average swapped in (:meth:`WeightAverage.applied`) and
trains on the raw weights.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def warmup_decay(decay: float, step: int) -> float:
    """The decay used by the update after optimiser step ``step`` (0-based)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """The moving average of ``model``'s trainable parameters (by name). The parameters are bound once:
    the model must keep them (in-place loads and device moves done before, as the epoch loop does)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an exponential moving average needs a decay in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trained]
        self.shadow: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in trained}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (after an optimiser step): one fused lerp over every parameter."""
        torch._foreach_lerp_(list(self.shadow.values()), self.params, 1.0 - warmup_decay(self.decay, self.steps))
        self.steps += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the model's own while the block runs, restored on exit."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, list(self.shadow.values()))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    def state_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "shadow": {n: s.cpu() for n, s in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.steps = int(state["steps"])  # type: ignore[arg-type]
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        for n, s in self.shadow.items():
            s.copy_(shadow[n])
