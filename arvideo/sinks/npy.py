"""Lossless `.npy` of uint8 frames `[F, H, W, 3]`, valid at every moment while it grows.

The header is written with a fixed 128-byte length, room for any shape; each `write()`
appends raw frames and then rewrites the header with the new frame count, so `np.load`
works on the file mid-run (a crash between the two steps leaves the previous, shorter
array plus unread trailing bytes). The file is written in place, under its final name.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from arvideo.errors import ConfigError
from arvideo.sinks.base import BaseSink

HEADER_BYTES = 128  # a multiple of 64, as numpy aligns; fits shapes with 20-digit sides


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A version 1.0 `.npy` header for C-ordered uint8 of `shape`, padded to HEADER_BYTES."""
    magic = np.lib.format.magic(1, 0)
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    room = HEADER_BYTES - len(magic) - 2 - 1  # 2 length bytes, trailing newline
    if len(text) > room:
        raise ConfigError(f"shape {shape} is too large for a {HEADER_BYTES}-byte .npy header")
    text = text.ljust(room) + "\n"
    return magic + (len(text)).to_bytes(2, "little") + text.encode("latin1")


class NpySink(BaseSink):
    """Appends frames to a `.npy` file whose header always matches the frames written."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: io.BufferedRandom | None = None

    def _write(self, frames: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self.path, "w+b")
            self._file.write(npy_header((0, *frames.shape[1:])))
        f = self._file
        f.seek(0, io.SEEK_END)
        f.write(frames.tobytes())
        f.flush()
        f.seek(0)
        f.write(npy_header((self.frames_written + frames.shape[0], *frames.shape[1:])))
        f.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
