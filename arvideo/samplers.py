"""Flow-matching samplers. Each chunk owns one sampler state (SkyReels keeps one per latent
frame; frames of a chunk always share their noise level, so one state per chunk is the same
arithmetic).

Convention (diffusers' flow_prediction): x_sigma = (1 - sigma) x0 + sigma eps, the model
predicts v = eps - x0, the model's timestep is sigma * 1000, and x0 = x - sigma v.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

SAMPLERS = ("unipc", "euler")
TIME_GRIDS = ("linear", "magi")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3-style time shift: sigma -> shift*sigma / (1 + (shift-1)*sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass
class EulerState:
    """Euler keeps no history; the state only counts steps taken."""

    taken: int = 0


class Sampler:
    """Step grid plus the per-chunk update rule.

    sigmas: [steps + 1] float32, from ~1 (noise) down to 0.
    timesteps: [steps] the values the model is conditioned on at each step.
    """

    def __init__(self, kind: str, steps: int, shift: float, grid: str = "linear", scheduler_config: dict | None = None):
        if kind not in SAMPLERS:
            raise ConfigError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
        if grid not in TIME_GRIDS:
            raise ConfigError(f"unknown time grid {grid!r}; choose one of {', '.join(TIME_GRIDS)}")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        self.kind, self.steps, self.shift = kind, steps, shift
        if kind == "unipc":
            if grid != "linear":
                raise ConfigError("the UniPC sampler uses diffusers' own flow grid; set sampler.grid=linear")
            from diffusers import UniPCMultistepScheduler

            cfg = dict(scheduler_config or {})
            cfg.update(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
            self._template = UniPCMultistepScheduler(**cfg)
            self._template.set_timesteps(steps)
            self.sigmas = self._template.sigmas.clone().float()
            self.timesteps = self._template.timesteps.clone()
        else:
            if grid == "magi":
                # MAGI-1: t from 0 (noise) to 1 (clean) as linspace**2; sigma = 1 - t, then shifted
                sig = 1.0 - np.linspace(0.0, 1.0, steps + 1) ** 2
            else:
                sig = np.linspace(1.0, 0.0, steps + 1)
            sig = shift_sigmas(sig, shift)
            self.sigmas = torch.from_numpy(sig.astype(np.float32))
            self.timesteps = self.sigmas[:-1] * 1000.0

    def new_state(self):
        """Fresh per-chunk state."""
        if self.kind == "unipc":
            return copy.deepcopy(self._template)
        return EulerState()

    def step(self, state, x: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
        """Advances x from sigma_k to sigma_{k+1} with velocity v (float32)."""
        if self.kind == "unipc":
            return state.step(v, self.timesteps[k], x, return_dict=False)[0]
        state.taken += 1
        return x + (self.sigmas[k + 1] - self.sigmas[k]) * v

    def predict_x0(self, x: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
        """Predicted clean latent at step k (for previews)."""
        return x - self.sigmas[k] * v
