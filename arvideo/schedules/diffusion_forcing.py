"""SkyReels-V2 diffusion forcing: the step matrix of diffusers, streamed one row per tick.

Block values follow diffusers' `generate_timestep_matrix`: 0 = not started, v in 1..steps =
this row takes step k = v - 1, steps + 1 = finished. A row is one engine tick.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from arvideo.errors import ConfigError
from arvideo.schedules.base import Tick

# A row in sparse form: (first, values). Blocks before `first` are finished (steps + 1),
# blocks from `first + len(values)` on have not started (0). Memory is O(chunks in flight).
SparseRow = tuple[int, tuple[int, ...]]


def timestep_index_matrix(
    num_blocks: int, steps: int, ar_step: int, num_pre_ready: int = 0
) -> torch.Tensor:
    """diffusers' block-level `step_index`: [rows, num_blocks] int64, one row per iteration.

    num_pre_ready: leading blocks that are already clean (diffusers counts frames and divides
    by causal_block_size; here it is blocks).
    """
    if num_blocks < 0 or steps < 1 or ar_step < 0 or num_pre_ready < 0:
        raise ConfigError(
            f"timestep_index_matrix needs num_blocks >= 0, steps >= 1, ar_step >= 0 and "
            f"num_pre_ready >= 0; got {num_blocks}, {steps}, {ar_step}, {num_pre_ready}"
        )
    done = steps + 1
    pre = [0] * num_blocks
    for i in range(min(num_pre_ready, num_blocks)):
        pre[i] = done
    rows: list[list[int]] = []
    while not all(v >= steps for v in pre):
        raw = [0] * num_blocks
        for i in range(num_blocks):
            raw[i] = pre[i] + 1 if i == 0 or pre[i - 1] >= steps else raw[i - 1] - ar_step
        pre = [min(max(v, 0), done) for v in raw]
        rows.append(pre)
    if not rows:
        return torch.zeros(0, num_blocks, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


def ticks_from_rows(rows: Iterator[SparseRow], steps: int) -> Iterator[Tick]:
    """Turns consecutive block-value rows into ticks.

    A block is active where diffusers' update_mask is true: (new != pre) & (new != steps + 1).
    A block whose previous value was `steps` took its last step on the previous tick, so it is
    committed now, exactly when diffusers first evaluates it at timestep 0.
    """
    prev: SparseRow = (0, ())
    for row in rows:
        lo = min(prev[0], row[0])
        hi = max(prev[0] + len(prev[1]), row[0] + len(row[1]))
        active: list[tuple[int, int]] = []
        commit: list[int] = []
        for i in range(lo, hi):
            before, after = _value(prev, i, steps), _value(row, i, steps)
            if before == steps:
                commit.append(i)
            elif after != before and after <= steps:
                active.append((i, after - 1))
        yield Tick(active=tuple(active), commit=tuple(commit))
        prev = row


def _value(row: SparseRow, block: int, steps: int) -> int:
    first, values = row
    if block < first:
        return steps + 1
    if block >= first + len(values):
        return 0
    return values[block - first]


@dataclass(frozen=True)
class DiffusionForcingSchedule:
    """SkyReels-V2 diffusion forcing over chunks of `causal_block_size` latent frames.

    ar_step > 0 (async): every chunk lags its predecessor by ar_step steps (diffusers'
        recurrence, unbounded). window_blocks only bounds how many chunks may be in flight.
    ar_step == 0 (sync): windows of `window_blocks` chunks (default: all) step together; the
        next window starts on the tick after the previous one finishes and commits it.
    The last chunk is shorter when num_latent_frames is not a multiple of causal_block_size.
    """

    num_latent_frames: int
    steps: int
    causal_block_size: int = 1
    ar_step: int = 0
    window_blocks: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("num_latent_frames", 1), ("steps", 1), ("causal_block_size", 1),
                              ("ar_step", 0), ("window_blocks", 1)):
            value = getattr(self, name)
            if value is None and name == "window_blocks":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
        window = self.window_blocks
        if self.ar_step > 0 and window is not None and self.num_chunks > window:
            minimum = math.ceil(self.steps / self.window_blocks)
            if self.ar_step < minimum:
                raise ConfigError(
                    f"ar_step={self.ar_step} is too small for steps={self.steps} with "
                    f"window_blocks={self.window_blocks}: more than {self.window_blocks} chunks "
                    f"would be in flight; set ar_step >= {minimum}, raise window_blocks, or use "
                    f"ar_step=0 (synchronous windows)"
                )

    @property
    def num_chunks(self) -> int:
        return -(-self.num_latent_frames // self.causal_block_size)

    @property
    def synchronous(self) -> bool:
        return self.ar_step == 0

    @property
    def _window(self) -> int:
        return min(self.window_blocks or self.num_chunks, self.num_chunks)

    @property
    def num_ticks(self) -> int:
        """Backbone calls for the whole video (= diffusers' row count for one window)."""
        if self.synchronous:
            return -(-self.num_chunks // self._window) * self.steps
        # A chunk never starts before its predecessor has taken its last step: lag is capped.
        return self.steps + (self.num_chunks - 1) * min(self.ar_step, self.steps)

    @property
    def max_in_flight(self) -> int:
        """Most chunks in one tick's backbone call (active + commit): sizes the engine's buffers."""
        if self.synchronous:
            return min(self.num_chunks, 2 * self._window)
        # Active chunks sit at values min(ar_step, steps) apart in 1..steps, plus one commit.
        return min(self.num_chunks, self.steps // min(self.ar_step, self.steps) + 1)

    def chunk_frames(self, index: int) -> tuple[int, int]:
        """[start, end) latent frame range of chunk `index`."""
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range (num_chunks={self.num_chunks})")
        start = index * self.causal_block_size
        return start, min(start + self.causal_block_size, self.num_latent_frames)

    def ticks(self) -> Iterator[Tick]:
        """Yields one Tick per row until every chunk has taken all its steps. Lazy."""
        return ticks_from_rows(self._sparse_rows(), self.steps)

    def value_rows(self) -> Iterator[tuple[int, ...]]:
        """Full block-value rows (diffusers' step_index, block level); O(num_chunks) each, for tests."""
        for row in self._sparse_rows():
            yield tuple(_value(row, i, self.steps) for i in range(self.num_chunks))

    def _sparse_rows(self) -> Iterator[SparseRow]:
        return self._sync_rows() if self.synchronous else self._async_rows()

    def _sync_rows(self) -> Iterator[SparseRow]:
        n, window = self.num_chunks, self._window
        for start in range(0, n, window):
            size = min(window, n - start)
            for value in range(1, self.steps + 1):
                yield start, (value,) * size

    def _async_rows(self) -> Iterator[SparseRow]:
        """diffusers' recurrence over the frontier; finished and unstarted blocks stay implicit."""
        n, steps, ar_step = self.num_chunks, self.steps, self.ar_step
        done = steps + 1
        first, values = 0, ()
        while first + len(values) < n or (values and values[-1] < steps):
            new: list[int] = []
            # The block before `first` is finished, so block `first` advances on its own.
            prev_raw, prev_before = 0, done
            for block in range(first, n):
                stored = block - first < len(values)
                before = values[block - first] if stored else 0
                raw = before + 1 if prev_before >= steps else prev_raw - ar_step
                after = min(max(raw, 0), done)
                if after == 0 and not stored:
                    break  # every later block stays at 0 too: raw only decreases from here
                new.append(after)
                prev_raw, prev_before = raw, before
            finished = 0
            while finished < len(new) and new[finished] == done:
                finished += 1
            first, values = first + finished, tuple(new[finished:])
            yield first, values
