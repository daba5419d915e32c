"""DeepCache for a transformer (the "DBCache" shape): always run the first and last blocks, reuse
the middle blocks' residual from the chunk's last full step.

On a full step the backbone runs every block and returns the member's residual across the
middle range, x_after - x_before; the policy keeps it with the chunk's K/V of that step. On a
shallow step the member runs only the leading and trailing blocks; across the middle range its
hidden state gets the kept residual added, and later members of the same call attend to its
kept middle-layer K/V (as they attend to a skipped chunk's). Full steps: 1:N (`interval`), or
non-uniform, denser early where features change fastest (`schedule="nonuniform"`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import PolicyContext
from .common import ForcedSteps


@dataclass
class DeepPlan:
    """What the backbone does for one member: blocks [first, num_layers - last) are the middle.

    residual None: a full step (the backbone reports the middle residual). Otherwise a shallow
    step: add `residual` [B, tokens, D] across the middle; `kv` holds the chunk's per-layer
    (k, v) from its last full step, used for the middle layers.
    """

    first: int
    last: int
    residual: torch.Tensor | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def full_steps(steps: int, interval: int, warmup: int, schedule: str = "uniform", power: float = 2.0) -> set[int]:
    """Steps that run every block: warm-up, last, and every `interval`-th (or a power-law spacing)."""
    forced = set(range(min(warmup, steps))) | {steps - 1}
    if schedule == "uniform":
        return forced | {s for s in range(warmup, steps) if (s - warmup) % max(1, interval) == 0}
    if schedule != "nonuniform":
        raise ValueError(f"unknown DeepCache schedule {schedule!r}; choose uniform or nonuniform")
    span = max(0, steps - 1 - warmup)
    count = max(1, math.ceil(span / max(1, interval)))
    return forced | {warmup + round(span * (i / count) ** power) for i in range(count + 1)}


class DeepCache:
    """One chunk's DeepCache state: joins every call, full or shallow."""

    def __init__(self, ctx: PolicyContext, interval: int = 3, first: int = 1, last: int = 1, warmup: int = 1,
                 schedule: str = "uniform", power: float = 2.0) -> None:
        self.ctx, self.first, self.last = ctx, int(first), int(last)
        self.full = full_steps(ctx.steps, interval, warmup, schedule, power)
        self.forced = ForcedSteps(ctx, warmup)
        self.residual: torch.Tensor | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.shallow_steps = 0

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        return True

    def deep_plan(self, step: int) -> DeepPlan:
        if step in self.full or self.residual is None:
            return DeepPlan(self.first, self.last)
        self.shallow_steps += 1
        return DeepPlan(self.first, self.last, self.residual, self.kv)

    def deep_observe(self, residual: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After a full step: the middle residual and the chunk's K/V of that step."""
        self.residual, self.kv = residual, kv

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        return None

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("DeepCache never skips a whole step")
