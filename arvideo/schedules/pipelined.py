"""MAGI-1 pipelined chunks: a new chunk enters every steps / window_size ticks."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from arvideo.errors import ConfigError
from arvideo.schedules.base import Tick


@dataclass(frozen=True, init=False)
class PipelinedSchedule:
    """Chunk i enters at tick i * (steps // window_size) and takes one step per tick.

    So at most window_size chunks step together, each at its own noise level. A chunk is
    committed on the tick after its last step. The last chunk is shorter when
    num_latent_frames is not a multiple of chunk_frames.
    """

    num_latent_frames: int
    steps: int
    frames_per_chunk: int = 6
    window_size: int = 4
    stage_ticks: int = field(init=False)

    def __init__(self, num_latent_frames: int, steps: int, chunk_frames: int = 6,
                 window_size: int = 4) -> None:
        for name, value in (("num_latent_frames", num_latent_frames), ("steps", steps),
                            ("chunk_frames", chunk_frames), ("window_size", window_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        if steps % window_size:
            lower = steps - steps % window_size
            options = f"{lower} or {lower + window_size}" if lower else f"{window_size}"
            raise ConfigError(
                f"steps={steps} is not a multiple of window_size={window_size}: each chunk spends "
                f"steps / window_size ticks per stage; step counts that work are multiples of "
                f"{window_size}, e.g. {options}"
            )
        object.__setattr__(self, "num_latent_frames", num_latent_frames)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "frames_per_chunk", chunk_frames)
        object.__setattr__(self, "window_size", window_size)
        object.__setattr__(self, "stage_ticks", steps // window_size)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_latent_frames // self.frames_per_chunk)

    @property
    def num_ticks(self) -> int:
        """Backbone calls: steps / window_size * (chunks + window_size - 1)."""
        return (self.num_chunks - 1) * self.stage_ticks + self.steps

    @property
    def max_in_flight(self) -> int:
        """Most chunks in one tick's backbone call (window_size active + one commit)."""
        return min(self.num_chunks, self.window_size + 1)

    def entry_tick(self, index: int) -> int:
        """Tick on which chunk `index` takes step 0."""
        return index * self.stage_ticks

    def chunk_frames(self, index: int) -> tuple[int, int]:
        """[start, end) latent frame range of chunk `index`."""
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range (num_chunks={self.num_chunks})")
        start = index * self.frames_per_chunk
        return start, min(start + self.frames_per_chunk, self.num_latent_frames)

    def ticks(self) -> Iterator[Tick]:
        """Yields one Tick per backbone call. Lazy: O(window_size) work and memory per tick."""
        s, steps, last = self.stage_ticks, self.steps, self.num_chunks - 1
        for t in range(self.num_ticks):
            first = max(0, -(-(t - steps + 1) // s))
            active = tuple((i, t - i * s) for i in range(first, min(last, t // s) + 1))
            since_done = t - steps
            commit = (since_done // s,) if since_done >= 0 and since_done % s == 0 else ()
            yield Tick(active=active, commit=commit)
