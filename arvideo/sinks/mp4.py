"""H.264 MP4 written as frames arrive, readable after a crash.

Choices, and why:
- libx264, yuv420p, CRF 18 by default (the range users expect is 16-23), BT.709 limited
  range, tagged as such so players convert back with the same matrix.
- Fragmented MP4 (`empty_moov+frag_every_frame+default_base_moof`) with `flush_packets`:
  every frame becomes its own fragment and reaches the operating system as soon as it is
  written, so a process killed with SIGKILL leaves a playable file. Data sits in the page
  cache, not fsync'd: it survives a killed process, not a power cut.
- `tune=zerolatency` (no B-frames, no lookahead): the encoder emits each frame's packet at
  once instead of holding ~40 frames back. Costs some compression at equal CRF.
- ffmpeg's mp4 muxer closes a fragment only when the next frame arrives (it needs the next
  timestamp), and PyAV offers no explicit fragment flush. So after a SIGKILL the file holds
  every frame written except the newest one; `close()` writes that one too.
- Nothing is written until the first frame arrives (the frame size is not known before).
- The time base is exactly 1/fps (a Fraction), so frame i is shown at i/fps.
- yuv420p needs even width and height: an odd side is padded by one pixel, repeating the
  last row/column, so a 63x65 input gives a 64x66 video.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from arvideo.errors import ConfigError
from arvideo.sinks.base import BaseSink

log = logging.getLogger(__name__)

MOVFLAGS = "empty_moov+frag_every_frame+default_base_moof"


def as_fraction(fps: int | float | Fraction) -> Fraction:
    """Frame rate as an exact fraction; 23.976-style floats map to 24000/1001."""
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ConfigError(f"fps must be positive, got {fps}")
    return rate


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pads `[n, H, W, 3]` by one edge-repeated row/column where H or W is odd."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


class Mp4Sink(BaseSink):
    """Streams frames into a fragmented H.264 MP4 (see the module docstring for the trade-offs)."""

    def __init__(self, path: str | Path, fps: int | Fraction, *, crf: int = 18, preset: str = "medium") -> None:
        super().__init__()
        if not 0 <= crf <= 51:
            raise ConfigError(f"crf must be in 0..51 (18 is visually lossless), got {crf}")
        if crf == 0:
            log.warning("crf=0 makes lossless H.264 (High 4:4:4 profile), which some players show as black")
        self.path = Path(path)
        self.fps = as_fraction(fps)
        self.crf = crf
        self.preset = preset
        self._container: av.container.OutputContainer | None = None
        self._stream = None

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(
            str(self.path), "w", format="mp4", options={"movflags": MOVFLAGS, "flush_packets": "1"}
        )
        stream = self._container.add_stream(
            "libx264",
            rate=self.fps,
            options={"crf": str(self.crf), "preset": self.preset, "tune": "zerolatency"},
        )
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / self.fps
        cc = stream.codec_context
        cc.colorspace = av.video.reformatter.Colorspace.ITU709
        cc.color_range = av.video.reformatter.ColorRange.MPEG
        cc.color_primaries = av.video.reformatter.ColorPrimaries.BT709
        cc.color_trc = av.video.reformatter.ColorTrc.BT709
        self._stream = stream

    def _write(self, frames: np.ndarray) -> None:
        frames = pad_to_even(frames)
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p",
                src_colorspace="ITU709",
                dst_colorspace="ITU709",
                dst_color_range="MPEG",
            )
            frame.pts = self.frames_written + i
            frame.time_base = 1 / self.fps
            self._container.mux(self._stream.encode(frame))

    def _close(self) -> None:
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            self._container.close()
