"""Baselines in the same engine: TeaCache (one global decision per tick) and FORA (fixed interval)."""
from __future__ import annotations

import torch

from .base import PolicyContext
from .common import IDENTITY_POLY, ForcedSteps, VelocityReuse, polyval, relative_l1


class TickDecision:
    """TeaCache's single decision, shared by every chunk in flight.

    The first chunk asked in a tick (the oldest non-forced one; the engine asks in causal order)
    decides for all: the relative change of its timestep modulation from its previous step to this
    one, rescaled by the model's polynomial, is accumulated against tau. A tick starts at the first
    question after any chunk has stepped.

    The change is the deciding chunk's own step-to-step change (as in TeaCache, whose one video is
    one trajectory), not the change since the previous tick: when a window of chunks finishes and
    a fresh one starts at high noise, the previous tick's modulation belongs to a clean step, and
    that jump lies far outside the range the polynomial was fitted on (on the embedded model it
    evaluated to -40,000 and stopped every later computation). A rescaled change is a magnitude,
    so a polynomial dipping below zero near x = 0 counts as zero.
    """

    def __init__(self, tau: float, poly=IDENTITY_POLY) -> None:
        self.tau, self.poly = float(tau), tuple(poly)
        self.accumulated = 0.0
        self.compute = True
        self.new_tick = True
        self._modulation: dict[int, torch.Tensor] = {}  # step -> modulation (one step grid per run)

    def _mod(self, ctx: PolicyContext, step: int) -> torch.Tensor:
        if step not in self._modulation:
            self._modulation[step] = ctx.modulation(ctx.timesteps[step])
        return self._modulation[step]

    def decide(self, ctx: PolicyContext, step: int, forced: bool) -> bool:
        if self.new_tick:
            self.new_tick = False
            if forced or step == 0:
                self.compute = True
            else:
                change = relative_l1(self._mod(ctx, step), self._mod(ctx, step - 1))
                self.accumulated += max(0.0, polyval(self.poly, change))
                self.compute = self.accumulated >= self.tau
            if self.compute:
                self.accumulated = 0.0
        return self.compute

    def stepped(self) -> None:
        self.new_tick = True


class TeaCache(VelocityReuse):
    """A chunk following the shared tick decision; forced steps (warm-up, last) still compute."""

    def __init__(self, ctx: PolicyContext, shared: TickDecision, warmup: int = 1) -> None:
        super().__init__(ctx)
        self.shared, self.forced = shared, ForcedSteps(ctx, warmup)

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        forced = self.forced(step)
        return self.shared.decide(self.ctx, step, forced) or forced

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        self.shared.stepped()
        super().observe(step, latents, velocity)

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        self.shared.stepped()
        return super().reuse(step, latents)


class Fora(VelocityReuse):
    """Computes every `interval`-th step after the warm-up (and the last step); reuses in between."""

    def __init__(self, ctx: PolicyContext, interval: int = 2, warmup: int = 1) -> None:
        super().__init__(ctx)
        self.interval, self.warmup = max(1, int(interval)), int(warmup)
        self.forced = ForcedSteps(ctx, warmup)

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        return self.forced(step) or (step - self.warmup) % self.interval == 0
