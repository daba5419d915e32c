"""The sink interface: frames go in as they are decoded, a file comes out."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, runtime_checkable

import numpy as np

from arvideo.errors import ConfigError


@runtime_checkable
class Sink(Protocol):
    """Where finished frames go. `write` appends in order; `close` finalises and is idempotent."""

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames `[n, H, W, 3]`, n >= 1."""

    def close(self) -> None:
        """Finalise the output; calling it again does nothing."""


class BaseSink:
    """Shared checks and context-manager support; subclasses implement `_write` and `_close`."""

    def __init__(self) -> None:
        self.frames_written = 0
        self.frame_size: tuple[int, int] | None = None  # (H, W), fixed by the first write
        self.closed = False

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames `[n, H, W, 3]`, n >= 1."""
        if self.closed:
            raise ConfigError(f"{type(self).__name__} is closed; open a new sink to write more frames")
        frames = check_frames(frames, self.frame_size)
        self.frame_size = (frames.shape[1], frames.shape[2])
        self._write(frames)
        self.frames_written += frames.shape[0]

    def close(self) -> None:
        """Finalise the output; calling it again does nothing."""
        if not self.closed:
            self.closed = True
            self._close()

    def _write(self, frames: np.ndarray) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def __enter__(self) -> BaseSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_frames(frames: np.ndarray, frame_size: tuple[int, int] | None = None) -> np.ndarray:
    """Validates uint8 `[n, H, W, 3]` (n >= 1) of a fixed size; returns it C-contiguous."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ConfigError(f"frames must be uint8 [n >= 1, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frame_size is not None and frames.shape[1:3] != frame_size:
        raise ConfigError(
            f"frames are {frames.shape[1]}x{frames.shape[2]} (HxW) but this sink already holds "
            f"{frame_size[0]}x{frame_size[1]} frames; one output holds one frame size"
        )
    return np.ascontiguousarray(frames)


def close_all(sinks) -> None:
    """Close every sink even if one fails, then re-raise the first failure."""
    errors = []
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


class MultiSink(BaseSink):
    """Fans every write out to several sinks, in the order given."""

    def __init__(self, sinks: list[Sink]) -> None:
        super().__init__()
        self.sinks = list(sinks)

    def _write(self, frames: np.ndarray) -> None:
        for sink in self.sinks:
            sink.write(frames)

    def _close(self) -> None:
        close_all(self.sinks)
