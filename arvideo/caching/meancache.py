"""MeanCache: skipped steps take the interval-average velocity, not the last velocity.

MeanFlow identity: u(z_t, t, s) = v(z_t, t) + (s - t) du/dt. The derivative is a finite
difference over the chunk's own history (no autograd): with r = sigma_{t-K},
    ubar = (z_t - z_r) / (sigma_t - sigma_r)          secant over the last K steps
    J    = (ubar - v_r) / (sigma_t - sigma_r)
A computed step t takes the model's v_t (plain step). Each skipped step i after it takes
    v_i = v_{i-1} + (sigma_{i+1} - sigma_i) * J_t
with J_t measured at the last computed step (K is a property of that step, as on the
schedule's edges). K = 1 gives J = 0 under Euler: plain velocity reuse. History is fp32.

The math is Euler's (x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v). Under UniPC the estimate is
handed to the sampler as if it were the model's output; see docs/caching.md for what that costs.

`estimator="slope"` (not methods.md's; an option): at run time the history between two computed
steps holds the estimates themselves, so the secant over it returns the slope already in use,
and J carries no information from the new model call (with K = 1 edges before it, J = 0 and
every skipped step is plain reuse). The slope estimator instead takes the velocity's derivative
from the chunk's last two *model* velocities, D = (v_t - v_p) / (sigma_t - sigma_p), and gives a
skipped step i the average of that line over the step:
    v_i = v_t + ((sigma_i + sigma_{i+1}) / 2 - sigma_t) * D
(exact when the velocity is linear in sigma along the trajectory; plain reuse until a chunk has
two computed steps). On this model the velocity is far from linear over 4-5 steps and the full
slope overshoots (docs/caching.md).

`estimator="fitted"`: the slope damped by alpha in [0, 1] (0: plain reuse, 1: the slope), fitted
by `arvideo calibrate` per edge: alpha(p, t, s) is the least-squares damping for the latents
reached at s after computed steps p < t and t+1..s-1 skipped, over calibration trajectories (the
schedule is chosen jointly by a second-order shortest path, `schedule.pair_shortest_path_schedule`).
A skipped step does not need to know the next computed step s (FlowCache, in the combination,
decides step by step): after each skipped step i the latents go exactly where the edge t -> i + 1
would have put them,
    v_i = v_t + (alpha(p, t, i + 1) c(t, i + 1) - alpha(p, t, i) c(t, i)) / (sigma_{i+1} - sigma_i) D
(`slope_weight` c, c(t, t + 1) = 0). Summed over an edge's skipped steps it telescopes to
alpha(p, t, s) c(t, s) D, so whichever step s computes next, the latents reached there are those
of the fitted edge t -> s; on a static schedule that is the same as damping every skipped step of
the edge by alpha(p, t, s).
"""
from __future__ import annotations

from collections import deque

import torch

from .base import PolicyContext

ESTIMATORS = ("secant", "slope", "fitted")


def finite_difference_jvp(z_t: torch.Tensor, sigma_t: float, z_r: torch.Tensor, sigma_r: float,
                          v_r: torch.Tensor) -> torch.Tensor:
    """du/dt along the trajectory from the secant over [sigma_r, sigma_t] and the velocity at r."""
    span = sigma_t - sigma_r
    ubar = (z_t - z_r) / span
    return (ubar - v_r) / span


def slope_weight(sigmas: list[float], t: int, s: int) -> float:
    """c(t, s) = sum over the skipped steps i = t+1..s-1 of (sigma_{i+1} - sigma_i) ((sigma_i + sigma_{i+1}) / 2 - sigma_t).

    With slope D, the skipped steps of the edge t -> s move the latents by c(t, s) D beyond plain reuse."""
    return sum((sigmas[i + 1] - sigmas[i]) * (0.5 * (sigmas[i] + sigmas[i + 1]) - sigmas[t]) for i in range(t + 1, s))


def average_velocity(v_t: torch.Tensor, jvp: torch.Tensor, sigma_t: float, sigma_s: float) -> torch.Tensor:
    """u(z_t, t, s) = v_t + (s - t) du/dt: the average velocity over [sigma_t, sigma_s]."""
    return v_t + (sigma_s - sigma_t) * jvp


class MeanVelocity:
    """Per-chunk fp32 history of (sigma, latents, velocity used) and the skipped-step estimate."""

    def __init__(self, ctx: PolicyContext, max_k: int, estimator: str = "secant",
                 edge_alphas: dict[tuple[int, int, int], float] | None = None) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown MeanCache estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if edge_alphas is not None and estimator != "fitted":
            raise ValueError("edge_alphas are the fitted estimator's damping; pass estimator='fitted'")
        self.ctx, self.estimator = ctx, estimator
        self.edge_alphas = dict(edge_alphas or {})  # "fitted": the damping per edge (p, t, s); none: reuse
        self.sigmas = [float(s) for s in ctx.sigmas]
        self.history: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque(maxlen=max(1, max_k) + 1)
        self.jvp: torch.Tensor | None = None
        self.velocity: torch.Tensor | None = None
        self.computed: deque[tuple[int, torch.Tensor]] = deque(maxlen=2)  # (step, model velocity), "slope"

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor, k: int) -> None:
        v = velocity.float()
        if self.estimator in ("slope", "fitted"):  # they read model velocities only, no latents history
            self.computed.append((step, v))
            self.velocity = v
            return
        z = latents.float().clone()
        self.jvp = self._jvp(step, z, k)
        self._record(step, z, v)

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        if self.velocity is None:
            raise RuntimeError(f"chunk {self.ctx.chunk} skipped step {step} before any computed step")
        if self.estimator in ("slope", "fitted"):
            (t, v_t) = self.computed[-1]
            v = v_t
            if len(self.computed) == 2:
                p, v_p = self.computed[0]
                weight = self._slope_weight(p, t, step)
                if weight != 0.0:
                    v = v_t + weight * ((v_t - v_p) / (self.sigmas[t] - self.sigmas[p]))
            self.velocity = v
            return v
        v = self.velocity
        if self.jvp is not None:
            v = v + (self.sigmas[step + 1] - self.sigmas[step]) * self.jvp
        self._record(step, latents.float().clone(), v)
        return v

    def _slope_weight(self, p: int, t: int, step: int) -> float:
        """The factor of the slope D in skipped step `step`'s velocity (computed steps p < t < step)."""
        sig = self.sigmas
        if self.estimator == "slope":
            return 0.5 * (sig[step] + sig[step + 1]) - sig[t]
        # fitted: per edge, telescoping (module docstring)
        after = self.edge_alphas.get((p, t, step + 1), 0.0) * slope_weight(sig, t, step + 1)
        before = self.edge_alphas.get((p, t, step), 0.0) * slope_weight(sig, t, step) if step > t + 1 else 0.0
        return (after - before) / (sig[step + 1] - sig[step])

    def _jvp(self, step: int, z: torch.Tensor, k: int) -> torch.Tensor | None:
        """J from the entry K steps back; None (J = 0) when that step is not in the history."""
        for s, z_r, v_r in self.history:
            if s == step - k:
                return finite_difference_jvp(z, self.sigmas[step], z_r, self.sigmas[s], v_r)
        return None

    def _record(self, step: int, z: torch.Tensor, v: torch.Tensor) -> None:
        self.history.append((step, z, v))
        self.velocity = v


class MeanCache:
    """Computes on a static schedule {step: K}; every other step uses the average-velocity estimate."""

    def __init__(self, ctx: PolicyContext, schedule: dict[int, int], estimator: str = "secant",
                 edge_alphas: dict[tuple[int, int, int], float] | None = None) -> None:
        self.ctx = ctx
        self.schedule = dict(schedule)
        self.default_k = max(self.schedule.values(), default=1)
        self.mean = MeanVelocity(ctx, max(self.schedule.values(), default=1), estimator, edge_alphas)

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        return step in self.schedule

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        self.mean.observe(step, latents, velocity, self.schedule.get(step, self.default_k))

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        return self.mean.reuse(step, latents)


def uniform_schedule(steps: int, budget: int, k: int = 2) -> dict[int, int]:
    """`budget` compute steps spread evenly over `steps` (first step included): the uncalibrated fallback."""
    budget = max(1, min(budget, steps))
    picks = sorted({round(i * steps / budget) for i in range(budget)})
    return {p: (1 if p == 0 else k) for p in picks}
