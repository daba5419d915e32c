"""`arvideo calibrate`: fit a model's cache calibration from full-compute runs.

Runs full-compute trajectories on calibration captions (world seeds < 10000; evaluation uses
seeds >= 10000), records every chunk's latents and velocities per step, and writes to
`<model>/cache_calibration.json`:
- MeanCache's edge costs C_K(t, s) = mean |u_ref - u_est| (u_ref the reference trajectory's
  average velocity over [sigma_t, sigma_s], u_est what computing at t and extrapolating with
  the K-step JVP through s - 1 gives), and the peak-suppressed shortest-path schedules for the
  requested budgets and gammas;
- (Euler only) the fitted slope estimator's tables (`estimator=fitted`): for every edge t -> s after the
  computed step p, the damping alpha of the slope (v_t - v_p) / (sigma_t - sigma_p) that best
  reproduces the latents reached at s (least squares, clipped to [0, 1]) and the RMS error left;
- the degree-4 polynomial mapping the relative change of the timestep modulation to the
  relative change of the velocity (FlowCache's SkyReels indicator and TeaCache).

Example: arvideo calibrate --model models/shapes-df --captions 4 --frames 48 --budgets 4,5,6,8
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .caching.base import PolicyContext
from .caching.calibration import FILENAME, fitted_schedule, save_entry
from .caching.common import relative_l1
from .caching.meancache import finite_difference_jvp, slope_weight
from .caching.schedule import displacement_costs, shortest_path_schedule

log = logging.getLogger(__name__)

CALIBRATION_SEEDS = 10_000  # world seeds below this are for calibration; evaluation uses the rest


@dataclass
class Trajectory:
    """One chunk's full-compute path: latents z_0..z_N and velocities v_0..v_{N-1} (fp32)."""

    latents: list[torch.Tensor] = field(default_factory=list)
    velocities: list[torch.Tensor] = field(default_factory=list)


class _Recording:
    """Computes every step and hands its (latents, velocity) to the recorder."""

    def __init__(self, trajectory: Trajectory) -> None:
        self.trajectory = trajectory

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        return True

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        self.trajectory.latents.append(latents.float().clone())
        self.trajectory.velocities.append(velocity.float().clone())

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("the recording policy never skips")


class Recorder:
    """A PolicyFactory (passed as the cache preset) that records every chunk's trajectory."""

    may_skip = False

    def __init__(self) -> None:
        self.trajectories: dict[int, Trajectory] = {}

    def __call__(self, ctx: PolicyContext) -> _Recording:
        self.trajectories[ctx.chunk] = Trajectory()
        return _Recording(self.trajectories[ctx.chunk])

    def __deepcopy__(self, memo):  # the run fingerprint deep-copies the config; the recorder is not config
        return self


class CostAccumulator:
    """Running means of the edge costs C_K(t, s) and of the per-step velocity change."""

    def __init__(self, sigmas: torch.Tensor, ks: tuple[int, ...]) -> None:
        self.sigmas = [float(s) for s in sigmas]
        self.n = len(self.sigmas) - 1
        self.ks = ks
        self.sums = {k: np.zeros((self.n + 1, self.n + 1)) for k in ks}
        self.velocity_change = np.zeros(self.n)
        self.count = 0

    def add(self, traj: Trajectory) -> None:
        """Adds one chunk's trajectory (latents must hold z_0..z_N)."""
        z, v, sig, n = traj.latents, traj.velocities, self.sigmas, self.n
        if len(z) != n + 1 or len(v) != n:
            raise ValueError(f"trajectory has {len(z)} latents and {len(v)} velocities, expected {n + 1} and {n}")
        for k in self.ks:
            table = self.sums[k]
            for t in range(n):
                table[t, t + 1:] += edge_costs(z, v, sig, t, k)
        for i in range(1, n):
            self.velocity_change[i] += relative_l1(v[i], v[i - 1])
        self.count += 1

    def costs(self) -> dict[int, list[list[float | None]]]:
        out = {}
        for k, table in self.sums.items():
            mean = table / max(self.count, 1)
            out[k] = [[float(mean[t, s]) if t < s else None for s in range(self.n + 1)] for t in range(self.n + 1)]
        return out


class SlopeAccumulator:
    """Least-squares sums for the fitted slope estimator over calibration trajectories.

    Computing at t (after the computed step p) and skipping t+1..s-1 with the damped slope
    reaches x_s = z_s + A + alpha B, where A = z_t + (sigma_s - sigma_t) v_t - z_s is plain reuse's
    error and B = c(t, s) (v_t - v_p) / (sigma_t - sigma_p) (`slope_weight`). Sums of <A, A>,
    <A, B> and <B, B> over every chunk give alpha = -<A, B> / <B, B> (clipped to [0, 1]) and the
    RMS error left, per edge.
    """

    def __init__(self, sigmas) -> None:
        self.sigmas = [float(s) for s in sigmas]
        n = self.n = len(self.sigmas) - 1
        self.aa = np.zeros((n + 1, n + 1))
        self.ab = np.zeros((n + 1, n + 1, n + 1))
        self.bb = np.zeros((n + 1, n + 1, n + 1))
        self.weights = np.array([[slope_weight(self.sigmas, t, s) if s > t else 0.0 for s in range(n + 1)]
                                 for t in range(n + 1)])
        self.numel = 0

    def add(self, traj: Trajectory) -> None:
        n = self.n
        z = torch.stack([x.double().flatten() for x in traj.latents])  # [n + 1, numel]
        v = torch.stack([x.double().flatten() for x in traj.velocities])  # [n, numel]
        if len(z) != n + 1 or len(v) != n:
            raise ValueError(f"trajectory has {len(z)} latents and {len(v)} velocities, expected {n + 1} and {n}")
        sig = torch.tensor(self.sigmas, dtype=torch.float64)
        for t in range(n):
            a = z[t] + (sig[t + 1:] - sig[t])[:, None] * v[t] - z[t + 1:]  # [s = t+1..n, numel]
            self.aa[t, t + 1:] += (a * a).sum(1).numpy()
            if t == 0:
                continue
            d = (v[t] - v[:t]) / (sig[t] - sig[:t])[:, None]  # [p = 0..t-1, numel]
            c = self.weights[t, t + 1:]
            self.ab[:t, t, t + 1:] += (d @ a.T).numpy() * c[None, :]
            self.bb[:t, t, t + 1:] += (d * d).sum(1).numpy()[:, None] * (c * c)[None, :]
        self.numel += z.shape[1]

    def tables(self) -> dict:
        """{"first": RMS error of 0 -> s, "edges": [[p, t, s, alpha, RMS error], ...]} (p < t < s)."""
        n, numel = self.n, max(self.numel, 1)
        first = [None] + [float(np.sqrt(max(self.aa[0, s], 0.0) / numel)) for s in range(1, n + 1)]
        edges = []
        for t in range(1, n):
            for s in range(t + 1, n + 1):
                for p in range(t):
                    ab, bb = self.ab[p, t, s], self.bb[p, t, s]
                    alpha = float(np.clip(-ab / bb, 0.0, 1.0)) if bb > 0 else 0.0
                    err = self.aa[t, s] + 2 * alpha * ab + alpha * alpha * bb
                    edges.append([p, t, s, round(alpha, 6), float(f"{np.sqrt(max(err, 0.0) / numel):.6g}")])
        return {"first": first, "edges": edges}


def edge_costs(z: list[torch.Tensor], v: list[torch.Tensor], sigmas: list[float], t: int, k: int) -> np.ndarray:
    """C_K(t, s) for s = t+1..N on one trajectory: mean |u_ref - u_est| (MeanCache's skipped-step rule)."""
    n = len(sigmas) - 1
    jvp = finite_difference_jvp(z[t], sigmas[t], z[t - k], sigmas[t - k], v[t - k]) if t - k >= 0 else None
    out = np.zeros(n - t)
    x, vel = z[t] + (sigmas[t + 1] - sigmas[t]) * v[t], v[t]
    for s in range(t + 1, n + 1):
        if s > t + 1:  # skipped step s - 1
            if jvp is not None:
                vel = vel + (sigmas[s] - sigmas[s - 1]) * jvp
            x = x + (sigmas[s] - sigmas[s - 1]) * vel
        span = sigmas[s] - sigmas[t]
        u_ref = (z[s] - z[t]) / span
        u_est = (x - z[t]) / span
        out[s - t - 1] = (u_ref - u_est).abs().mean().item()
    return out


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 4) -> list[float]:
    """Least-squares polynomial y ~ p(x), highest power first, padded to degree + 1 coefficients."""
    deg = max(0, min(degree, len(x) - 1))
    coeffs = np.polyfit(x, y, deg) if len(x) else np.zeros(1)
    return [0.0] * (degree - deg) + [float(c) for c in coeffs]


def calibrate(engine, base_cfg, captions: list[tuple[int, str]], budgets=(4, 6, 8), gammas=(2.0,),
              ks=(1, 2, 3), progress: bool = False) -> dict:
    """Full-compute runs on `captions` -> one calibration-file entry (costs, polynomial, schedules)."""
    from .samplers import Sampler

    for seed, _ in captions:
        if seed >= CALIBRATION_SEEDS:
            raise ValueError(f"calibration caption seed {seed} is in the evaluation range (>= {CALIBRATION_SEEDS})")
    r = engine.resolve(base_cfg)
    sc = r.cfg.sampler
    sampler = Sampler(sc.name, r.steps, sc.shift, sc.grid, engine.model.scheduler_config)
    acc = CostAccumulator(sampler.sigmas, tuple(ks))
    # the fitted estimator is Euler's math and is used under Euler only (caching.build_meancache)
    slope = SlopeAccumulator(sampler.sigmas) if sc.name == "euler" else None
    for seed, caption in captions:
        recorder = Recorder()
        cfg = replace(base_cfg, prompt=caption, seed=seed, cache=replace(base_cfg.cache, preset=recorder))
        for finished in engine.stream(cfg, decode=False, progress=progress):
            traj = recorder.trajectories.pop(finished.index)
            traj.latents.append(finished.latents.float())
            acc.add(traj)
            if slope is not None:
                slope.add(traj)
    modulation = [engine.backbone.modulation(t) for t in sampler.timesteps]
    x = np.array([relative_l1(modulation[i], modulation[i - 1]) for i in range(1, r.steps)])
    y = acc.velocity_change[1:] / max(acc.count, 1)
    costs = acc.costs()
    finite = {k: [[np.inf if c is None else c for c in row] for row in tab] for k, tab in costs.items()}
    schedules = []
    for kind, table in (("displacement", displacement_costs(finite, sampler.sigmas)), ("velocity", finite)):
        for gamma in gammas:
            for budget in budgets:
                s = shortest_path_schedule(table, budget, gamma)
                schedules.append({"cost_kind": kind, "budget": int(budget), "gamma": float(gamma),
                                  "compute": s.compute, "K": s.ks, "cost": s.cost})
    slope_tables = slope.tables() if slope is not None else None
    for gamma in gammas if slope_tables else ():
        for budget in budgets:
            compute, alphas = fitted_schedule(slope_tables, r.steps, budget, gamma)
            schedules.append({"cost_kind": "fitted", "budget": int(budget), "gamma": float(gamma),
                              "compute": sorted(compute), "alpha": [alphas[t] for t in sorted(compute)]})
    return {
        "sampler": sc.name, "steps": r.steps, "shift": float(sc.shift), "grid": sc.grid,
        "sigmas": [float(s) for s in sampler.sigmas],
        "captions": [[seed, caption] for seed, caption in captions], "frames": r.cfg.frames,
        "chunks": acc.count,
        "modulation_change": x.tolist(), "velocity_change": y.tolist(),
        "modulation_poly": fit_polynomial(x, y),
        "costs": {str(k): tab for k, tab in costs.items()},
        **({"slope": slope_tables} if slope_tables else {}),
        "schedules": schedules,
    }


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `calibrate` on an argparse subparsers object (the lead wires it into arvideo.cli)."""
    p = subparsers.add_parser("calibrate", help="fit cache calibration (MeanCache schedules, FlowCache polynomial)")
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: embedded shapes model)")
    p.add_argument("--captions", type=int, default=4, help="calibration captions (world seeds 0..N-1)")
    p.add_argument("--frames", type=int, default=48, help="video frames per calibration run")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", default=None, choices=["euler", "unipc"], help="default: the model's")
    p.add_argument("--budgets", default="3,4,5,6,8,10", help="model calls per chunk to solve schedules for")
    p.add_argument("--gammas", default="2", help="peak-suppression exponents")
    p.add_argument("--ks", default="1,2,3", help="JVP orders K to cost")
    p.add_argument("--out", default=None, help=f"calibration file (default: <model>/{FILENAME})")
    p.add_argument("--config", action="append", default=None, help="YAML config file (repeatable)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def run(args) -> int:
    """Runs the calibration described by parsed `args` and writes the calibration file."""
    from .config import build_config
    from .engine import Engine
    from .evaluate import heldout_captions

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides or [])
    if args.steps is not None:
        overrides.append(f"sampler.steps={args.steps}")
    if args.sampler is not None:
        overrides.append(f"sampler.name={args.sampler}")
    cfg = build_config(args.config, overrides, frames=args.frames, device=args.device, dtype=args.dtype)
    engine = Engine.from_folder(args.model, cfg.device, cfg.dtype, cfg.attention)
    captions = heldout_captions(args.captions, 0)
    entry = calibrate(engine, cfg, captions, _ints(args.budgets), _floats(args.gammas), tuple(_ints(args.ks)),
                      progress=not args.quiet)
    out = Path(args.out) if args.out else Path(engine.model.path) / FILENAME
    save_entry(out, entry)
    if not args.quiet:
        for s in entry["schedules"]:
            label = f"alpha {[round(a, 2) for a in s['alpha']]}" if "alpha" in s else f"K {s['K']} cost {s['cost']:.4g}"
            print(f"{s['cost_kind']:>12} budget {s['budget']:>3} gamma {s['gamma']:.1f}: compute {s['compute']} {label}",
                  file=sys.stderr)
        print(f"wrote {out} ({entry['sampler']}, {entry['steps']} steps, {entry['chunks']} chunks)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="arvideo calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
