"""Running one job: `run_job` streams the engine's chunks into the job's outputs; `JobResult` says what happened."""
from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelFolderError, PromptError
from .jobs import Job
from .outputs import JobOutputs
from .state import JobState, load_job_state

log = logging.getLogger(__name__)

_INPUT_ERRORS = (ConfigError, PromptError, ModelFolderError)


@dataclass
class JobResult:
    """What happened to one job."""

    name: str
    ok: bool
    frames: int
    total_frames: int
    seconds: float
    outputs: list[str] = field(default_factory=list)
    reason: str | None = None
    error_type: str | None = None
    left: list[str] = field(default_factory=list)  # files a failed job left (its partial mp4)
    resumed_from: int = 0
    model_calls: int = 0
    peak_bytes: int | None = None
    input_error: bool = False  # the request itself was bad (prompt, settings, model folder); nothing written


def _preview_dir(preview: str | Path | None, job: Job) -> Path | None:
    return None if preview is None else Path(preview) / job.name


def run_job(
    job: Job,
    engine,
    *,
    atomic: bool = True,
    resume: bool = False,
    save_state: bool = True,
    state_every: float = 0.0,
    preview: str | Path | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_chunk: Callable[[Any], None] | None = None,
) -> JobResult:
    """Renders one job with `engine`; never raises for a failed job (see JobResult), except on Ctrl-C.

    resume: continue from the job's state file if there is one. state_every: seconds between
    state saves (0: after every chunk). preview: a directory for live previews.
    on_progress(frames done) is called after every chunk (and once at the start of a resumed
    run); on_chunk(FrameChunk) after every chunk was written.
    """
    from ..preview import LatentProjection, PreviewWriter

    t0 = time.perf_counter()
    outputs: JobOutputs | None = None
    writer: PreviewWriter | None = None
    saved: JobState | None = None
    done = 0
    total = job.cfg.frames
    state_path = job.state_path
    try:
        r = engine.resolve(job.cfg)
        total = r.cfg.frames
        if resume and state_path.exists():
            saved = load_job_state(state_path, job.outputs)
            done = saved.emitted_frames
            if on_progress:
                on_progress(done)
        outputs = JobOutputs(job.outputs, r.fps, atomic=atomic)
        if preview is not None:
            writer = PreviewWriter(preview, name=job.name, total_frames=total, steps=r.steps,
                                   projection=LatentProjection.from_vae(engine.model.vae),
                                   temporal_factor=engine.model.temporal_factor, start_frame=done)
        tail: dict[str, Any] = {"start": 0, "frames": None, "saved_at": -math.inf}

        def on_state(get) -> None:
            frames = tail["frames"]
            if frames is None or tail["start"] + len(frames) >= total:
                return  # nothing written yet, or finished: no state needed
            now = time.monotonic()
            if now - tail["saved_at"] < state_every:
                return
            JobState.wrap(get(), tail["start"], frames, job.outputs).save(state_path)
            tail["saved_at"] = now

        stream = engine.stream(job.cfg, resume=saved, on_state=on_state if save_state else None,
                               callback=writer.on_step if writer else None)
        for chunk in stream:
            if not outputs.opened:
                outputs.open(saved)
            if len(chunk.frames):
                outputs.write(chunk.frames)
                tail["start"], tail["frames"] = chunk.start, chunk.frames
            done = chunk.start + len(chunk.frames)
            if writer:
                writer.on_chunk(chunk)
            if on_chunk and len(chunk.frames):
                on_chunk(chunk)
            if on_progress:
                on_progress(done)
        if not outputs.opened:
            outputs.open(saved)
        final = outputs.commit()
        state_path.unlink(missing_ok=True)
        if writer:
            writer.finish(True)
        return JobResult(job.name, True, done, total, time.perf_counter() - t0, [str(p) for p in final],
                         resumed_from=saved.emitted_frames if saved else 0, model_calls=engine.model_calls)
    except KeyboardInterrupt:
        if outputs is not None and outputs.opened:
            outputs.close()  # everything written so far stays; the state file allows --resume
        raise
    except Exception as exc:
        log.debug("job %s failed:\n%s", job.name, traceback.format_exc())
        started = outputs is not None and outputs.opened
        left: list[Path] = []
        if started:
            left = outputs.abort()
            state_path.unlink(missing_ok=True)  # this run's state led here; a resume would too
        if writer:
            writer.finish(False, f"{type(exc).__name__}: {exc}")
        return JobResult(job.name, False, done, total, time.perf_counter() - t0, reason=str(exc),
                         error_type=type(exc).__name__, left=[str(p) for p in left],
                         input_error=isinstance(exc, _INPUT_ERRORS) and not started)
