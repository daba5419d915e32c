"""The per-chunk cache-policy interface. Each chunk owns one instance and decides alone."""
from __future__ import annotations

from typing import Protocol

import torch


class CachePolicy(Protocol):
    """Decides, every step of its own chunk, whether the chunk's model call happens."""

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        """True: the chunk joins this tick's backbone call. False: `reuse` supplies its velocity."""

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        """Sees the (guided) velocity the model produced for this chunk at `step`."""

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Velocity for a skipped step."""
