"""`none`: full compute. The reference every other policy is measured against."""
from __future__ import annotations

import torch


class NoCache:
    """Computes every step."""

    def __init__(self, ctx=None) -> None:
        self.ctx = ctx

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        return True

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        return None

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("NoCache never skips a step")
