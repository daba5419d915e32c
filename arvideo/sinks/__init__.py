"""Outputs for finished frames: `open_sink(path, fps)` picks one by the path's suffix.

| path                               | sink         | notes                                      |
|------------------------------------|--------------|--------------------------------------------|
| `*.mp4`                            | Mp4Sink      | H.264, fragmented, playable after a crash  |
| `*.gif`                            | GifSink      | in memory until close, then renamed        |
| `*.npy`                            | NpySink      | lossless uint8 [F, H, W, 3], valid growing |
| `dir/`, an existing dir, no suffix | PngDirSink   | frame_000000.png, ...                      |

`PreviewSink` (one PNG, newest frame) and `MultiSink` (fan-out) are built directly.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from arvideo.errors import ConfigError
from arvideo.sinks.base import BaseSink, MultiSink, Sink, check_frames
from arvideo.sinks.images import GifSink, PngDirSink
from arvideo.sinks.mp4 import Mp4Sink, as_fraction
from arvideo.sinks.npy import NpySink
from arvideo.sinks.preview import PreviewSink

__all__ = [
    "BaseSink",
    "GifSink",
    "Mp4Sink",
    "MultiSink",
    "NpySink",
    "PngDirSink",
    "PreviewSink",
    "Sink",
    "SUPPORTED",
    "check_frames",
    "open_sink",
]

SUPPORTED = (".mp4", ".gif", ".npy", "a directory (path ending in '/', or no suffix) of PNG frames")


def open_sink(path: str | Path, fps: int | Fraction, *, crf: int = 18) -> Sink:
    """Opens the output that `path`'s suffix names; creates parent directories."""
    text = str(path)
    path = Path(path)
    as_fraction(fps)  # validates fps for every format
    if text.endswith(("/", "\\")) or path.is_dir() or not path.suffix:
        return PngDirSink(path)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return Mp4Sink(path, fps, crf=crf)
    if suffix == ".gif":
        return GifSink(path, float(fps))
    if suffix == ".npy":
        return NpySink(path)
    hint = ""
    if suffix == ".png":
        hint = " (for PNG frames give a directory such as 'frames/'; PreviewSink writes one PNG)"
    raise ConfigError(f"unsupported output '{text}': supported are {', '.join(SUPPORTED)}{hint}")
