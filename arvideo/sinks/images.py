"""GIF and PNG-directory outputs, through imageio's pillow plugin.

- GIF: Pillow cannot append to a GIF, so imageio's pillow plugin keeps the frames in
  memory until `close()`; use GIF for short clips. The file is written as
  `name.partial.gif` and renamed on close, so `name.gif` only ever exists complete.
  Loops forever; each frame lasts 1000/fps ms, which GIF stores in 10 ms units (16 fps
  -> 60 ms). Pillow merges a frame identical to the previous one into it (longer duration).
- PNG directory: one lossless file per frame, `frame_000000.png`, `frame_000001.png`, ...
  numbered from 0 in write order; each is written to a temporary name and renamed, so a
  listed PNG is always complete. Existing files of the same names are overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from arvideo.sinks.base import BaseSink


class GifSink(BaseSink):
    """Looping GIF at `fps`, finalised (renamed into place) on close."""

    def __init__(self, path: str | Path, fps: float) -> None:
        super().__init__()
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.stem + ".partial" + self.path.suffix)
        self.duration_ms = 1000.0 / fps
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None

    def _write(self, frames: np.ndarray) -> None:
        if self._writer is None:
            self._writer = iio.imopen(self.partial_path, "w", plugin="pillow", extension=".gif")
        self._writer.write(frames, is_batch=True, duration=self.duration_ms, loop=0)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            os.replace(self.partial_path, self.path)


class PngDirSink(BaseSink):
    """One PNG per frame in a directory: frame_000000.png, frame_000001.png, ..."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def frame_path(self, index: int) -> Path:
        """Where frame `index` (from 0) is written."""
        return self.directory / f"frame_{index:06d}.png"

    def _write(self, frames: np.ndarray) -> None:
        for i, frame in enumerate(frames):
            final = self.frame_path(self.frames_written + i)
            tmp = final.with_name("." + final.name + ".tmp")
            iio.imwrite(tmp, frame, plugin="pillow", extension=".png")
            os.replace(tmp, final)
