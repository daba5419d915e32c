"""One chunk's state while it is in flight."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Chunk:
    """A group of latent frames denoised together; owns its sampler state and cache policy.

    latents: [1, C, f, h, w] float32, at noise level sigma_{step}.
    step: the next step index to take (0..steps); == steps once clean.
    """

    index: int
    frame_start: int
    frame_end: int
    latents: torch.Tensor
    sampler_state: Any
    policy: Any
    step: int = 0
    velocity: torch.Tensor | None = field(default=None, repr=False)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)  # last computed step's K/V
    guidance: Any = None  # its GuidanceReuse (caching/guidance.py): whether its next call needs the CFG pass

    @property
    def num_frames(self) -> int:
        return self.frame_end - self.frame_start
