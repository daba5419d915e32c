"""What a schedule tells the engine each tick: which chunks step, which get committed."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Tick:
    """One engine tick (one backbone call, at most).

    active: (chunk index, step index k) for every chunk that takes denoising step k this
        tick, i.e. moves from sigma_k to sigma_{k+1}; ordered by chunk index. k runs 0..steps-1.
    commit: chunks whose last step was taken on an earlier tick and whose clean K/V must be
        written to the KV store before any later chunk needs them; the engine runs them at the
        clean timestep in this tick's call, ahead of the active chunks. Ordered by chunk index.
    """

    active: tuple[tuple[int, int], ...]
    commit: tuple[int, ...] = field(default_factory=tuple)


class Schedule(Protocol):
    """Which chunks are in flight at which noise level. No model code."""

    steps: int
    num_chunks: int

    def chunk_frames(self, index: int) -> tuple[int, int]:
        """[start, end) latent frame range of chunk `index` (absolute frame indices)."""

    def ticks(self) -> Iterator[Tick]:
        """Yields ticks until every chunk has taken all its steps. Lazy: O(in-flight) memory."""
