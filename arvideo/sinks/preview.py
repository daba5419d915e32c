"""A single PNG that always shows the newest frame, for watching a run from outside."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from arvideo.sinks.base import BaseSink


class PreviewSink(BaseSink):
    """Rewrites `path` with the last frame of each write.

    Atomic (temp file + os.replace), so a viewer polling the file never reads half a PNG.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, frames: np.ndarray) -> None:
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        iio.imwrite(tmp, frames[-1], plugin="pillow", extension=".png")
        os.replace(tmp, self.path)
