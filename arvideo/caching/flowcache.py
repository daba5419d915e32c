"""FlowCache: each chunk accumulates its own change indicator and decides alone when to recompute.

Indicators (methods.md section 2):
- `patch` (MAGI-1 port): r = mean|f_k - f_{k-1}| / (mean|f_{k-1}| + 1e-8) of the patch
  embedding f of the chunk's noisy latents;
- `modulation` (SkyReels port, TeaCache-style): the relative L1 change of the timestep
  modulation vector, rescaled by a per-model degree-4 polynomial (`arvideo calibrate` fits it).
A chunk accumulates A += r and reuses while A < tau; otherwise it computes and resets A = 0.
It always computes its first `warmup` steps and its last step.

A third indicator, `slope` (arvideo's, not the paper's), reads the chunk's model velocities
instead of its inputs: after computed steps p < t, skipping t+1..i leaves the latents at i+1
about c(t, i+1) |D| away from where plain reuse puts them (D = (v_t - v_p) / (sigma_t - sigma_p),
c = meancache.slope_weight: the velocity's own change over the skipped span), so
A = c(t, i+1) mean|D| / mean|v_t| (in units of sigma) is the chunk's predicted drift, and it
computes once A >= tau. A chunk with one computed step computes (no slope yet).

What a skipped step reuses: the chunk's last velocity, which the sampler scales by the current
step's dt (`reuse="velocity"`), MeanCache's average-velocity estimate (`reuse="mean"`, the
combination; with `estimator="fitted"` the calibrated damped slope, caching/meancache.py), or
the chunk's residual across all transformer blocks (`reuse="residual"`, `ResidualFlowCache`):
the chunk then still joins the call but runs only the patch embedding and the output head on
its current latents and timestep, with every block's K/V kept. An optional
static schedule (MeanCache's calibrated one) makes its steps compute whatever the indicator
says: the indicator then only adds computes where a chunk changes faster than calibrated.
"""
from __future__ import annotations

import torch

from .base import PolicyContext
from .common import IDENTITY_POLY, ForcedSteps, VelocityReuse, polyval, relative_l1
from .deepcache import DeepPlan
from .meancache import MeanVelocity, slope_weight

INDICATORS = ("patch", "modulation", "slope")
REUSE = ("velocity", "mean", "residual")


class ChangeIndicator:
    """The per-step relative change of one chunk, computed once per step whatever the decision."""

    def __init__(self, ctx: PolicyContext, kind: str, poly=IDENTITY_POLY) -> None:
        if kind not in INDICATORS:
            raise ValueError(f"unknown FlowCache indicator {kind!r}; choose one of {', '.join(INDICATORS)}")
        self.ctx, self.kind, self.poly = ctx, kind, tuple(poly)
        self.step: int | None = None
        self.previous: torch.Tensor | None = None
        self.change = 0.0

    def update(self, step: int, latents: torch.Tensor) -> float:
        """Relative change from the last seen step to `step` (0 on the first one); idempotent per step."""
        if step == self.step:
            return self.change
        if self.kind == "patch":
            feature = self.ctx.features(latents)
        else:
            feature = self.ctx.modulation(self.ctx.timesteps[step])
        if self.previous is None:
            self.change = 0.0
        else:
            r = relative_l1(feature, self.previous)
            # a rescaled change is a magnitude: a fitted polynomial dipping below 0 near r = 0 counts as 0
            self.change = max(0.0, polyval(self.poly, r)) if self.kind == "modulation" else r
        self.step, self.previous = step, feature
        return self.change


class SlopeIndicator:
    """The `slope` indicator: the drift a chunk predicts for skipping, from its last two model velocities."""

    def __init__(self, ctx: PolicyContext) -> None:
        self.sigmas = [float(x) for x in ctx.sigmas]
        self.last: tuple[int, torch.Tensor] | None = None  # (last computed step t, its velocity)
        self.rate: float | None = None  # mean|D| / mean|v_t| at t

    def observe(self, step: int, velocity: torch.Tensor) -> None:
        v = velocity.float()
        if self.last is not None:
            p, v_p = self.last
            slope = (v - v_p).abs().mean() / abs(self.sigmas[step] - self.sigmas[p])
            self.rate = (slope / (v.abs().mean() + 1e-8)).item()
        self.last = (step, v)

    def predicted(self, step: int) -> float:
        """A for skipping step `step` (and every step since the last computed one)."""
        if self.rate is None:  # fewer than two computed steps: no slope yet
            return float("inf")
        return abs(slope_weight(self.sigmas, self.last[0], step + 1)) * self.rate


class FlowCache:
    """One chunk's FlowCache state: accumulated change against tau, warm-up and last step forced."""

    def __init__(self, ctx: PolicyContext, tau: float, warmup: int = 5, indicator: str = "patch",
                 poly=IDENTITY_POLY, reuse: str = "velocity", k: int = 2, max_skip: int | None = None,
                 schedule: dict[int, int] | None = None, estimator: str = "secant",
                 edge_alphas: dict[tuple[int, int, int], float] | None = None, last: bool = True) -> None:
        if reuse not in REUSE:
            raise ValueError(f"unknown FlowCache reuse {reuse!r}; choose one of {', '.join(REUSE)}")
        self.ctx, self.tau, self.k = ctx, float(tau), int(k)
        # optional static floor (a MeanCache schedule {step: K}): these steps always compute
        self.schedule = dict(schedule or {})
        self.forced = ForcedSteps(ctx, warmup, last)
        self.slope = SlopeIndicator(ctx) if indicator == "slope" else None
        self.indicator = None if self.slope is not None else ChangeIndicator(ctx, indicator, poly)
        self.max_skip = max_skip
        self.accumulated = 0.0
        self.skipped_in_a_row = 0
        max_k = max([self.k, *self.schedule.values()])
        if reuse != "mean" and (estimator != "secant" or edge_alphas is not None):
            raise ValueError("estimator and edge_alphas choose MeanCache's estimate: they need reuse='mean'")
        self.reuser = MeanVelocity(ctx, max_k, estimator, edge_alphas=edge_alphas) if reuse == "mean" else VelocityReuse(ctx)

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        change = self.indicator.update(step, latents) if self.indicator is not None else 0.0
        if (self.forced(step) or step in self.schedule
                or (self.max_skip is not None and self.skipped_in_a_row >= self.max_skip)):
            return True
        if self.slope is not None:  # the predicted drift is already the whole span's
            self.accumulated = self.slope.predicted(step)
        else:
            self.accumulated += change
        return self.accumulated >= self.tau

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        if self.indicator is not None:
            self.indicator.update(step, latents)  # steps the engine forced without asking
        else:
            self.slope.observe(step, velocity)
        self.accumulated = 0.0
        self.skipped_in_a_row = 0
        if isinstance(self.reuser, MeanVelocity):
            self.reuser.observe(step, latents, velocity, self.schedule.get(step, self.k))
        else:
            self.reuser.observe(step, latents, velocity)

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        self.skipped_in_a_row += 1
        return self.reuser.reuse(step, latents)


class ResidualFlowCache(FlowCache):
    """FlowCache reusing the residual across all blocks: a skipped chunk runs the head only.

    It always joins the backbone call (should_compute is True); the FlowCache decision picks a
    full pass or a head-only pass (DeepCache's partial compute with no leading/trailing blocks).
    """

    def __init__(self, ctx: PolicyContext, tau: float, warmup: int = 5, indicator: str = "patch",
                 poly=IDENTITY_POLY, max_skip: int | None = None) -> None:
        super().__init__(ctx, tau, warmup, indicator, poly, "velocity", 1, max_skip)
        self.full = True
        self.residual: torch.Tensor | None = None
        self.kv = None

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        self.full = super().should_compute(step, latents)
        return True

    def deep_plan(self, step: int) -> DeepPlan:
        if self.full or self.residual is None:
            self.full = True
            return DeepPlan(0, 0)
        return DeepPlan(0, 0, self.residual, self.kv)

    def deep_observe(self, residual: torch.Tensor, kv) -> None:
        self.residual, self.kv = residual, kv

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        if self.full:
            super().observe(step, latents, velocity)
        else:
            self.skipped_in_a_row += 1
        self.full = True  # a step the engine forces without asking is a full one
