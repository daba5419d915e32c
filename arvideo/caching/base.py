"""The per-chunk cache-policy interface. Each chunk owns one instance and decides alone."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class PolicyContext:
    """What a chunk's policy may know about its chunk and the model, given at creation.

    sigmas: [steps + 1] noise levels of the chunk's step grid; timesteps: [steps] model timesteps.
    features(latents) -> patch-embedding features [1, tokens, D] of latents [1, C, f, h, w].
    modulation(timestep) -> timestep modulation vector [6 D] (one scalar timestep).
    """

    chunk: int
    steps: int
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    features: Callable[[torch.Tensor], torch.Tensor]
    modulation: Callable[[torch.Tensor], torch.Tensor]


class BackboneProbe:
    """Gives policies the backbone's cheap probes without making run snapshots carry the model.

    Copying or pickling a probe never copies the backbone: a copy is the same probe, a pickled
    one comes back detached, and the engine re-attaches it to its backbone on resume.
    """

    def __init__(self, backbone=None) -> None:
        self.backbone = backbone

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        return self.backbone.patch_features(latents)

    def modulation(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.backbone.modulation(timestep)

    def __deepcopy__(self, memo) -> BackboneProbe:
        return self

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.backbone = None


class CachePolicy(Protocol):
    """Decides, every step of its own chunk, whether the chunk's model call happens."""

    def should_compute(self, step: int, latents: torch.Tensor) -> bool:
        """True: the chunk joins this tick's backbone call. False: `reuse` supplies its velocity."""

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        """Sees the (guided) velocity the model produced for this chunk at `step`."""

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Velocity for a skipped step."""


class PolicyFactory(Protocol):
    """Makes one policy per chunk. `may_skip` False lets the engine skip K/V bookkeeping."""

    may_skip: bool

    def __call__(self, ctx: PolicyContext) -> CachePolicy: ...
