"""A job's outputs: written under working names, cut back and continued on resume, then committed or aborted."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..sinks.base import close_all
from .resume import _resume_mp4, _resume_npy, _resume_png_dir
from .state import JobState


def _kind(path: Path) -> str:
    text = str(path)
    if text.endswith(("/", "\\")) or path.is_dir() or not path.suffix:
        return "dir"
    return path.suffix.lower()[1:]


def _partial_name(path: Path) -> Path:
    return path.with_name(path.stem + ".partial" + path.suffix)


class JobOutputs:
    """A job's output files: opened (or cut back and continued) on the first frames, then committed or aborted."""

    def __init__(self, paths: list[Path], fps, *, atomic: bool) -> None:
        self.paths = [Path(p) for p in paths]
        self.fps = fps
        self.atomic = atomic
        self.sinks: list = []
        self.opened = False

    def working_path(self, path: Path) -> Path:
        return _partial_name(path) if self.atomic and _kind(path) == "npy" else path

    def open(self, state: JobState | None = None) -> None:
        """Creates the sinks; with `state`, first cuts every output back to its emitted frames."""
        from ..sinks import open_sink

        if state is None or state.emitted_frames == 0:
            self.sinks = [open_sink(self.working_path(p), self.fps) for p in self.paths]
            self.opened = True
            return
        keep = state.emitted_frames
        for p in self.paths:  # check everything before the first file is touched
            work = self.working_path(p)
            if _kind(p) == "gif":
                raise ConfigError(f"{p}: a GIF is held in memory until the end and cannot be resumed; "
                                  "delete the state file to start over, or make the GIF from the finished mp4/npy")
            if _kind(p) != "dir" and not work.exists() and state.tail_start > 0:
                raise ConfigError(f"cannot resume: {work} is missing (it held the first {keep} frames); "
                                  "delete the state file to start over")
        frame_size = tuple(state.tail.shape[1:3])
        self.opened = True
        for p in self.paths:
            work = self.working_path(p)
            kind = _kind(p)
            if kind == "mp4":
                sink, held = _resume_mp4(work, self.fps, keep, frame_size)
            elif kind == "npy":
                sink, held = _resume_npy(work, keep, frame_size)
            else:
                sink, held = _resume_png_dir(work, keep)
            self.sinks.append(sink)
            if held < state.tail_start:
                raise ConfigError(f"cannot resume: {work} holds {held} frames, the state needs at least "
                                  f"{state.tail_start}; delete the state file to start over")
            if held < keep:
                sink.write(state.tail[held - state.tail_start :])

    def write(self, frames: np.ndarray) -> None:
        for sink in self.sinks:
            sink.write(frames)

    def close(self) -> None:
        close_all(self.sinks)

    def commit(self) -> list[Path]:
        """Finalises and renames every output into place; returns the final paths."""
        self.close()
        for p in self.paths:
            work = self.working_path(p)
            if work != p and work.exists():
                os.replace(work, p)
        return self.paths

    def abort(self) -> list[Path]:
        """After a failure: keeps only the playable mp4 (atomic mode: renamed name.partial.mp4)."""
        if not self.atomic:
            try:
                self.close()
            except Exception:
                pass
            return [p for p in self.paths if p.exists()]
        left = []
        for p, sink in zip(self.paths, self.sinks):
            kind = _kind(p)
            if kind != "gif":  # closing a GifSink would rename it into place
                try:
                    sink.close()
                except Exception:
                    pass
            if kind == "mp4" and p.exists():
                os.replace(p, _partial_name(p))
                left.append(_partial_name(p))
            elif kind == "npy":
                self.working_path(p).unlink(missing_ok=True)
            elif kind == "gif":
                writer = getattr(sink, "_writer", None)  # close without renaming into place
                if writer is not None:
                    writer.close()
                _partial_name(p).unlink(missing_ok=True)
            elif kind == "dir":
                for i in range(sink.frames_written):
                    sink.frame_path(i).unlink(missing_ok=True)
                try:
                    p.rmdir()
                except OSError:
                    pass
        return left
