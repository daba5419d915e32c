"""Per-chunk cache policies, selected by preset name (`--cache PRESET`).

A preset is a policy name with optional parameters, `flowcache:tau=0.05,warmup=3`, or the name
of a YAML file in `configs/cache/` (or a path to one) holding `policy:` plus parameters; the
`name:key=value` suffix overrides the file's values. Library callers may also pass a
PolicyFactory object as the preset.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..samplers import SAMPLERS
from .base import CachePolicy, PolicyContext, PolicyFactory
from .baselines import Fora, TeaCache, TickDecision
from .calibration import costs_from_entry, edge_alphas, find_entry, fitted_schedule
from .common import IDENTITY_POLY
from .deepcache import DeepCache
from .flowcache import FlowCache, ResidualFlowCache
from .guidance import GuidanceReuse, guidance_for
from .meancache import MeanCache, uniform_schedule
from .none import NoCache
from .schedule import displacement_costs, shortest_path_schedule

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "cache"


class _Factory:
    """One policy per chunk; model calibration looked up once, on the first chunk's step grid."""

    def __init__(self, make: Callable[[PolicyContext, dict | None], CachePolicy], may_skip: bool,
                 model_dir: Path | None, calibrated: bool = False) -> None:
        self.make, self.may_skip, self.model_dir = make, may_skip, model_dir
        self.guidance = (1, 1)  # (guidance_every, guidance_warmup): see caching/guidance.py
        self._entry: dict | None = None
        self._looked_up = not calibrated

    def __call__(self, ctx: PolicyContext) -> CachePolicy:
        if not self._looked_up:
            self._entry, self._looked_up = find_entry(self.model_dir, ctx.sigmas), True
        return self.make(ctx, self._entry)


def _poly(entry: dict | None) -> tuple[float, ...]:
    return tuple(entry["modulation_poly"]) if entry and entry.get("modulation_poly") else IDENTITY_POLY


def build_none(steps: int, model_dir):
    return _Factory(lambda ctx, entry: NoCache(ctx), False, model_dir)


def build_flowcache(steps: int, model_dir, tau: float = 0.05, warmup: int = 5, indicator: str = "patch",
                    reuse: str = "velocity", k: int = 2, max_skip: int | None = None):
    """FlowCache (methods.md 2); reuse: velocity | mean (the combination) | residual (head-only pass)."""
    if reuse == "residual":
        return _Factory(lambda ctx, entry: ResidualFlowCache(ctx, tau, warmup, indicator, _poly(entry), max_skip),
                        True, model_dir, calibrated=indicator == "modulation")
    return _Factory(lambda ctx, entry: FlowCache(ctx, tau, warmup, indicator, _poly(entry), reuse, k, max_skip),
                    True, model_dir, calibrated=indicator == "modulation")


def build_combination(steps: int, model_dir, tau: float = 0.05, warmup: int = 3, indicator: str = "patch",
                      k: int = 2, max_skip: int | None = None, budget: int | None = None, gamma: float = 2.0,
                      cost: str = "displacement", estimator: str = "secant", last: bool = True):
    """Per-chunk FlowCache decisions; skipped steps take MeanCache's average velocity.

    budget: also compute the calibrated MeanCache schedule of this many calls (with its K per step);
    FlowCache's indicator then adds computes on top of it, per chunk.
    estimator: `secant` (methods.md's JVP) or `fitted` (the calibrated damped slope of the chunk's
    last two model velocities, per edge, caching/meancache.py; with `budget`, the floor is the
    fitted schedule). `fitted` needs the model's Euler calibration with slope tables and the Euler
    sampler; otherwise the policy warns and runs `secant`, as `meancache` does.
    last: force the chunk's last step (FlowCache's rule; `last=false` lets the indicator decide).
    """
    if estimator == "slope":
        raise ConfigError("combination takes estimator=secant or estimator=fitted (slope is meancache's diagnostic)")
    if estimator == "fitted" and cost != "displacement":
        raise ConfigError("estimator=fitted chooses its schedule by the error of the latents reached "
                          "(cost=displacement); drop cost=velocity or pick estimator=secant")
    fitted = _FittedTables("combination")
    # the fitted floor runs through the steps FlowCache forces anyway (its warm-up and last step)
    force = _forced_steps(steps, warmup, bool(last)) if estimator == "fitted" and budget is not None else ()

    def make(ctx: PolicyContext, entry: dict | None) -> FlowCache:
        slope = fitted(entry) if estimator == "fitted" else None
        if slope is None:
            schedule = _schedule(ctx, entry, budget, gamma, k, cost) if budget is not None else None
            return FlowCache(ctx, tau, warmup, indicator, _poly(entry), "mean", k, max_skip, schedule, last=bool(last))
        schedule = None
        if budget is not None:
            schedule = (fitted.solve(slope, ctx.steps, budget, gamma, force)[0] if budget < ctx.steps
                        else {s: 1 for s in range(ctx.steps)})
        return FlowCache(ctx, tau, warmup, indicator, _poly(entry), "mean", 1, max_skip, schedule,
                         estimator="fitted", edge_alphas=fitted.edges(slope), last=bool(last))

    return _Factory(make, True, model_dir,
                    calibrated=budget is not None or indicator == "modulation" or estimator == "fitted")


def _schedule(ctx: PolicyContext, entry: dict | None, budget: int, gamma: float, k: int,
              cost: str = "displacement", force: tuple[int, ...] = ()) -> dict[int, int]:
    """MeanCache's compute steps {step: K}: the calibrated shortest path, else an even spread.

    force: steps the schedule must compute (the shortest path runs through them)."""
    if budget >= ctx.steps:  # nothing to skip: full compute, whatever the costs say
        return {s: k for s in range(ctx.steps)}
    if entry is not None and entry.get("costs"):
        costs = costs_from_entry(entry)
        if cost == "displacement":
            costs = displacement_costs(costs, entry["sigmas"])
        return shortest_path_schedule(costs, budget, gamma, force).as_dict()
    if force:
        rest = uniform_schedule(ctx.steps, max(1, budget - len(set(force) - {0})), k)
        return {**rest, **{f: rest.get(f, k) for f in force}}
    return uniform_schedule(ctx.steps, budget, k)


def _forced_steps(steps: int, warmup: int, last: bool) -> tuple[int, ...]:
    """A skipping policy's usual forced computes: its first `warmup` steps and, with `last`, its last."""
    if int(warmup) < 1:
        raise ConfigError(f"warmup={warmup}: the first step always computes, use warmup >= 1")
    return tuple(range(min(int(warmup), steps))) + ((steps - 1,) if last else ())


def build_meancache(steps: int, model_dir, budget: int | None = None, gamma: float = 2.0, k: int = 2,
                    cost: str = "displacement", warmup: int = 1, last: bool = False, estimator: str = "secant"):
    """MeanCache on the peak-suppressed shortest-path schedule for `budget` model calls per chunk.

    Calibrated edge costs come from the model's calibration file; without one the budget is
    spread evenly with JVP order k. warmup / last: steps the path must compute, as every other
    skipping policy does (its first `warmup` steps; its last step with `last=true`); the budget
    includes them. estimator: `secant` (methods.md), `slope` or `fitted` (caching/meancache.py);
    `fitted` takes its schedule and its per-step damping from the calibration file's slope
    tables (a second-order shortest path: an edge's error depends on the computed step before
    it). It is Euler's math and is used under the Euler sampler only: under another sampler, or
    without slope tables, the policy runs `secant` (with a warning saying why), as the presets did
    before session 13 (docs/caching.md: under UniPC the fitted estimator measured worse).
    """
    budget = steps if budget is None else int(budget)
    force = _forced_steps(steps, warmup, last)
    if estimator == "fitted" and cost != "displacement":
        raise ConfigError("estimator=fitted chooses its schedule by the error of the latents reached "
                          "(cost=displacement); drop cost=velocity or pick estimator=secant")
    fitted = _FittedTables("meancache")

    def make(ctx: PolicyContext, entry: dict | None) -> MeanCache:
        if estimator == "fitted" and budget >= ctx.steps:
            return MeanCache(ctx, {s: 1 for s in range(ctx.steps)}, estimator)
        slope = fitted(entry) if estimator == "fitted" else None
        if slope is not None:
            schedule, _ = fitted.solve(slope, ctx.steps, budget, gamma, force)
            return MeanCache(ctx, schedule, estimator, fitted.edges(slope))
        chosen = "secant" if estimator == "fitted" else estimator
        return MeanCache(ctx, _schedule(ctx, entry, budget, gamma, k, cost, force), chosen)

    return _Factory(make, True, model_dir, calibrated=True)


class _FittedTables:
    """The fitted estimator's calibration for one run: the slope tables of the model's Euler entry,
    the schedule solved once per step grid, and one warning naming the fix when they are missing."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.warned = False
        self.solved: dict[tuple, tuple[dict[int, int], dict[int, float]]] = {}
        self._edges: tuple[dict, dict] | None = None  # (slope tables, their damping per edge)

    def __call__(self, entry: dict | None) -> dict | None:
        """The entry's slope tables, or None (and a warning, once) when the policy must run `secant`."""
        if entry is not None and entry.get("slope") and entry.get("sampler") == "euler":
            return entry["slope"]
        if not self.warned:
            self.warned = True
            if entry is not None and entry.get("sampler") != "euler":
                log.warning("%s estimator=fitted is Euler's math and measured worse under %s; using the secant "
                            "estimator (set sampler.name=euler to use it).", self.policy, entry.get("sampler"))
            else:
                log.warning("%s estimator=fitted: no Euler calibration with slope tables for this step grid; "
                            "using the secant estimator. Run `arvideo calibrate --sampler euler` for this model "
                            "to fit them.", self.policy)
        return None

    def solve(self, slope: dict, n: int, budget: int, gamma: float, force: tuple[int, ...]):
        key = (n, budget, gamma, force)
        if key not in self.solved:
            self.solved[key] = fitted_schedule(slope, n, budget, gamma, force)
        return self.solved[key]

    def edges(self, slope: dict) -> dict[tuple[int, int, int], float]:
        """Damping per edge, built once (a run looks its calibration entry up once)."""
        if self._edges is None or self._edges[0] is not slope:
            self._edges = (slope, edge_alphas(slope))
        return self._edges[1]


def build_teacache(steps: int, model_dir, tau: float = 0.1, warmup: int = 1):
    """TeaCache: one decision per tick shared by all chunks in flight (a baseline)."""
    shared: list[TickDecision] = []  # one decision state per run, made with the model's polynomial

    def make(ctx: PolicyContext, entry: dict | None) -> TeaCache:
        if not shared:
            shared.append(TickDecision(tau, _poly(entry)))
        return TeaCache(ctx, shared[0], warmup)

    return _Factory(make, True, model_dir, calibrated=True)


def build_fora(steps: int, model_dir, interval: int = 2, warmup: int = 1):
    """FORA: fixed-interval reuse (a baseline)."""
    return _Factory(lambda ctx, entry: Fora(ctx, interval, warmup), True, model_dir)


def build_deepcache(steps: int, model_dir, interval: int = 3, first: int = 1, last: int = 1, warmup: int = 1,
                    schedule: str = "uniform", power: float = 2.0):
    """DeepCache: first/last blocks every step, middle blocks' residual reused between full steps."""
    return _Factory(lambda ctx, entry: DeepCache(ctx, interval, first, last, warmup, schedule, power), True, model_dir)


POLICIES: dict[str, Callable[..., PolicyFactory]] = {
    "none": build_none, "flowcache": build_flowcache, "combination": build_combination,
    "meancache": build_meancache, "teacache": build_teacache, "fora": build_fora, "deepcache": build_deepcache,
}
PRESETS = POLICIES  # the built-in names; YAML presets in configs/cache/ are found by name too
CHOICES = {"indicator": ("patch", "modulation", "slope"), "reuse": ("velocity", "mean", "residual"),
           "schedule": ("uniform", "nonuniform"), "cost": ("displacement", "velocity"),
           "estimator": ("secant", "slope", "fitted")}


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text)
    return text if isinstance(value, (dict, list)) else value


def parse_preset(preset: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,key=value' -> (policy name, parameters), with configs/cache/<name>.yaml read in."""
    name, _, rest = preset.partition(":")
    params: dict[str, Any] = {}
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{name}.yaml"
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        if "policy" not in loaded:
            raise ConfigError(f"cache preset file {path} needs a 'policy:' key ({', '.join(POLICIES)})")
        name = loaded.pop("policy")
        params.update(loaded)
    elif name not in POLICIES:
        found = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"unknown cache preset {name!r}; available: {', '.join(sorted(set(POLICIES) | set(found)))}")
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"cache preset parameter {item!r} is not key=value (e.g. flowcache:tau=0.05)")
        params[key.strip()] = _parse_value(value.strip())
    if name not in POLICIES:
        raise ConfigError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return name, params


def preset_sampler(preset: str | PolicyFactory) -> str | None:
    """The sampler a preset asks for (its `sampler:` key), or None. The engine uses it where the
    user set no `sampler.name`: MeanCache's average-velocity steps are Euler's math, so the presets
    built on them say `sampler: euler`."""
    if not isinstance(preset, str):
        return None
    sampler = parse_preset(preset)[1].get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise ConfigError(f"cache preset {preset!r}: sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return sampler


def make_policy_factory(preset: str | PolicyFactory, steps: int, model_dir: Path | None = None) -> PolicyFactory:
    """A factory making one fresh policy per chunk for the named preset."""
    if not isinstance(preset, str):
        if callable(preset) and hasattr(preset, "may_skip"):
            return preset
        raise ConfigError(f"cache preset must be a name or a PolicyFactory, got {type(preset).__name__}")
    name, params = parse_preset(preset)
    params.pop("sampler", None)  # for the engine (preset_sampler), not the policy
    # guidance reuse works with every policy: the engine gives each chunk a GuidanceReuse
    guidance = (params.pop("guidance_every", 1), params.pop("guidance_warmup", 1))
    GuidanceReuse(*guidance)  # validates
    builder = POLICIES[name]
    valid = [p for p in inspect.signature(builder).parameters if p not in ("steps", "model_dir")]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"cache policy {name!r} has no parameter {', '.join(unknown)}; "
                          f"valid: {', '.join(valid + ['guidance_every', 'guidance_warmup'])}")
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"cache parameter {key}={value} must be finite")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"cache parameter {key}={value!r}: choose one of {', '.join(CHOICES[key])}")
    factory = builder(steps, model_dir, **params)
    factory.guidance = guidance
    return factory


__all__ = ["CachePolicy", "GuidanceReuse", "NoCache", "guidance_for", "PolicyContext", "PolicyFactory", "POLICIES", "PRESETS",
           "make_policy_factory", "parse_preset", "preset_sampler"]
