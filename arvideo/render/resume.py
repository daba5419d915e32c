"""Cutting a killed job's outputs back to its state's frames and continuing them (mp4 re-mux, npy, PNG dir)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .jobs import Job


def _annexb(data: bytes, length_size: int = 4) -> bytes:
    """Length-prefixed H.264 NAL units (as stored in mp4) -> Annex B start-code form (as x264 emits)."""
    out, i = bytearray(), 0
    while i + length_size <= len(data):
        size = int.from_bytes(data[i : i + length_size], "big")
        i += length_size
        out += b"\x00\x00\x00\x01" + data[i : i + size]
        i += size
    return bytes(out)


def _resume_mp4(path: Path, fps, keep: int, frame_size: tuple[int, int]):
    """An Mp4Sink continuing `path` after its first `keep` frames (fewer if the file holds fewer).

    The kept packets are copied into a new file (`path` + '.resume'), which then replaces
    `path`; the open sink keeps writing into it. Returns (sink, frames copied).
    """
    import av

    from ..sinks import Mp4Sink

    tmp = path.with_name(path.name + ".resume")
    sink = Mp4Sink(tmp, fps)
    copied = 0
    if path.exists() and keep > 0:
        try:
            src = av.open(str(path))
        except av.error.FFmpegError:
            src = None  # nothing readable: the frames come from the state's tail
        if src is not None:
            with src:
                stream = src.streams.video[0]
                extradata = stream.codec_context.extradata or b""
                length_size = (extradata[4] & 3) + 1 if len(extradata) > 4 and extradata[0] == 1 else 4
                # the mp4 stores padded (even) sizes; frame_size is what the job writes
                sink._open(stream.codec_context.height, stream.codec_context.width)
                try:
                    for packet in src.demux(stream):
                        if copied >= keep:
                            break
                        if packet.size == 0 or packet.dts is None:
                            continue
                        copy = av.Packet(_annexb(bytes(packet), length_size))
                        copy.pts, copy.dts, copy.duration = packet.pts, packet.dts, packet.duration
                        copy.time_base, copy.is_keyframe = packet.time_base, packet.is_keyframe
                        copy.stream = sink._stream
                        sink._container.mux(copy)
                        copied += 1
                except av.error.FFmpegError:
                    pass  # a fragment cut short by the kill: everything before it is kept
    sink.frames_written, sink.frame_size = copied, frame_size
    if tmp.exists():  # nothing was copied otherwise: the sink opens `path` on its first frames
        os.replace(tmp, path)
    sink.path = path
    return sink, copied


def _resume_npy(path: Path, keep: int, frame_size: tuple[int, int]):
    """An NpySink continuing `path` after its first `keep` frames. Returns (sink, frames kept)."""
    from ..sinks import NpySink
    from ..sinks.npy import npy_header

    class _Appending(NpySink):
        def __init__(self, p: Path, held: int) -> None:
            super().__init__(p)
            self._file = open(p, "r+b")
            self.frames_written, self.frame_size = held, frame_size

    held = 0
    if path.exists():
        with open(path, "rb") as f:
            try:
                np.lib.format.read_magic(f)
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
                offset = f.tell()
            except ValueError:
                shape, offset = (0,), None
        if offset is not None and tuple(shape[1:3]) == tuple(frame_size):
            frame_bytes = frame_size[0] * frame_size[1] * 3
            held = min(shape[0], (path.stat().st_size - offset) // frame_bytes, keep)
            with open(path, "r+b") as f:
                f.truncate(offset + held * frame_bytes)
                f.seek(0)
                f.write(npy_header((held, *frame_size, 3)))
    if held == 0:
        sink = NpySink(path)
        return sink, 0
    return _Appending(path, held), held


def _resume_png_dir(path: Path, keep: int):
    from ..sinks import PngDirSink

    sink = PngDirSink(path)
    held = 0
    while held < keep and sink.frame_path(held).exists():
        held += 1
    for f in path.glob("frame_*.png"):
        try:
            index = int(f.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        if index >= held:
            f.unlink()
    sink.frames_written = held
    return sink, held


def remove_resume_leftovers(jobs: list[Job]) -> None:
    """Deletes temporary files of an interrupted re-mux (`name.mp4.resume`)."""
    for job in jobs:
        for p in job.outputs:
            leftover = p.with_name(p.name + ".resume")
            if leftover.exists():
                leftover.unlink()
