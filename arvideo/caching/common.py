"""Small pieces every skipping policy shares: forced steps, relative change, velocity reuse."""
from __future__ import annotations

import torch

from .base import PolicyContext

# Identity rescaling: without a fitted polynomial the raw relative change is accumulated.
IDENTITY_POLY = (0.0, 0.0, 0.0, 1.0, 0.0)


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean|new - old| / (mean|old| + 1e-8), FlowCache's and TeaCache's change indicator."""
    return ((new - old).abs().mean() / (old.abs().mean() + 1e-8)).item()


def polyval(coeffs, x: float) -> float:
    """Polynomial with coefficients highest power first (numpy's order)."""
    y = 0.0
    for c in coeffs:
        y = y * x + float(c)
    return y


class ForcedSteps:
    """The steps a chunk always computes: its first `warmup` steps and its last step."""

    def __init__(self, ctx: PolicyContext, warmup: int, last: bool = True) -> None:
        self.warmup, self.last_step = int(warmup), ctx.steps - 1 if last else None

    def __call__(self, step: int) -> bool:
        return step < self.warmup or step == self.last_step


class VelocityReuse:
    """Reuses the chunk's last computed velocity; the sampler scales it by the current step's dt."""

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.velocity: torch.Tensor | None = None

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        self.velocity = velocity.float()

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        if self.velocity is None:
            raise RuntimeError(f"chunk {self.ctx.chunk} skipped step {step} before any computed step")
        return self.velocity
