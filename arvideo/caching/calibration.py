"""The per-model calibration file (`<model>/cache_calibration.json`, written by `arvideo calibrate`).

One entry per step grid (sampler, steps, shift): the sigmas it was measured on, the fitted
modulation polynomial (FlowCache's SkyReels indicator, TeaCache), and MeanCache's edge costs
C_K(t, s) plus the schedules solved from them. A policy picks the entry whose sigmas match its
chunk's grid.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .schedule import pair_shortest_path_schedule

log = logging.getLogger(__name__)

FILENAME = "cache_calibration.json"


def calibration_path(model_dir: Path | str | None) -> Path | None:
    return Path(model_dir) / FILENAME if model_dir is not None else None


def load_entries(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    return json.loads(path.read_text()).get("entries", [])


def find_entry(model_dir: Path | str | None, sigmas: torch.Tensor) -> dict | None:
    """The entry measured on this sigma grid, else None (with a warning naming the fix)."""
    path = calibration_path(model_dir)
    entries = load_entries(path)
    grid = [float(s) for s in sigmas]
    for e in entries:
        ref = e.get("sigmas", [])
        if len(ref) == len(grid) and all(abs(a - b) < 1e-5 for a, b in zip(ref, grid)):
            return e
    if model_dir is not None:
        log.warning("no cache calibration for this step grid (%d steps) in %s; using uncalibrated defaults. "
                    "Run `arvideo calibrate --model %s --steps %d` (with the same sampler) to fit one.",
                    len(grid) - 1, path, model_dir, len(grid) - 1)
    return None


def costs_from_entry(entry: dict) -> dict[int, list[list[float]]]:
    """costs[K][t][s] with JSON's null (undefined) as inf."""
    out = {}
    for k, table in entry["costs"].items():
        out[int(k)] = [[float("inf") if v is None else float(v) for v in row] for row in table]
    return out


def save_entry(path: Path, entry: dict) -> None:
    """Adds or replaces the entry with the same sampler/steps/shift in the file at `path`."""
    entries = load_entries(path) if path.is_file() else []
    key = (entry["sampler"], entry["steps"], round(float(entry["shift"]), 6))
    entries = [e for e in entries if (e["sampler"], e["steps"], round(float(e["shift"]), 6)) != key]
    entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "entries": entries}, indent=1))


def edge_alphas(slope: dict) -> dict[tuple[int, int, int], float]:
    """The fitted estimator's damping per edge {(p, t, s): alpha} from a `SlopeAccumulator.tables()`."""
    return {(int(p), int(t), int(s)): float(alpha) for p, t, s, alpha, _ in slope["edges"]}


def fitted_schedule(slope: dict, n: int, budget: int, gamma: float = 2.0,
                    force: tuple[int, ...] = ()) -> tuple[dict[int, int], dict[int, float]]:
    """The fitted estimator's schedule {step: 1} and damping {step: alpha} from a `SlopeAccumulator.tables()`."""
    costs = {(p, t, s): cost for p, t, s, _, cost in slope["edges"]}
    alphas = edge_alphas(slope)
    compute = pair_shortest_path_schedule(slope["first"], costs, n, budget, gamma, force)
    nodes = compute + [n]
    damping = {t: float(alphas.get((p, t, s), 0.0)) for p, t, s in zip(nodes[:-2], nodes[1:-1], nodes[2:])}
    return {t: 1 for t in compute}, {0: 0.0, **damping}
