"""Guidance reuse: a chunk runs the unconditional (CFG) pass on some of its model calls only.

With classifier-free guidance every model call runs the network twice, conditional and
unconditional (batch 2), and the engine takes `v = v_uncond + g (v_cond - v_uncond)`. The
guidance direction `d = v_cond - v_uncond` changes slowly between neighbouring steps (the
observation behind FasterCache's CFG-Cache), so a chunk may run the conditional pass alone and
take `v = v_cond + (g - 1) d_cached`, with `d_cached` from its own last call that ran both.

Each chunk owns one `GuidanceReuse` and decides for itself, like its cache policy: the
unconditional pass runs on its first `warmup` model calls, then on every `every`-th one after
them (warm-up 1, every 3: calls 0, 3, 6, ...; 1 and 2 reuse the direction from call 0). A backbone
call runs conditional-only when none of the chunks it computes needs the unconditional pass (and
it commits nothing: committed K/V must exist for both passes); one chunk that needs it makes the
whole call batch 2, and every chunk in it then refreshes its cached direction.

Set per preset: `--cache fast:guidance_every=2` (and `guidance_warmup=`). `guidance_every=1`, the
default, is plain CFG on every call (bit-identical to not having this at all).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import ConfigError


@dataclass
class GuidanceReuse:
    every: int = 1
    warmup: int = 1
    calls: int = 0  # model calls this chunk has taken part in
    delta: torch.Tensor | None = field(default=None, repr=False)  # v_cond - v_uncond of its last full call

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"guidance_every={self.every!r}: must be an integer >= 1 (1 = guidance on every call)")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ConfigError(f"guidance_warmup={self.warmup!r}: must be an integer >= 1 (the first call needs "
                              "both passes)")

    def to(self, device) -> GuidanceReuse:
        """A copy whose cached direction lives on `device` (run snapshots keep it on the CPU)."""
        return replace(self, delta=None if self.delta is None else self.delta.to(device))

    @property
    def active(self) -> bool:
        return self.every > 1

    def needs_uncond(self) -> bool:
        """Whether this chunk's next model call must run the unconditional pass."""
        if self.delta is None or self.every == 1:
            return True
        return self.calls < self.warmup or (self.calls - self.warmup) % self.every == self.every - 1

    def full(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Guided velocity from both passes; remembers their direction when reuse is on."""
        self.calls += 1
        if self.every > 1:
            self.delta = v_cond - v_uncond
        return v_uncond + scale * (v_cond - v_uncond)

    def reuse(self, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Guided velocity from the conditional pass and the cached direction."""
        if self.delta is None:
            raise RuntimeError("guidance reuse before any call with both passes")  # pragma: no cover
        self.calls += 1
        return v_cond + (scale - 1.0) * self.delta


def guidance_for(policy_factory) -> GuidanceReuse:
    """A fresh per-chunk state for the run's preset (plain CFG for a factory that names none)."""
    return GuidanceReuse(*getattr(policy_factory, "guidance", (1, 1)))
