"""The local runner: jobs rendered in this process, `parallel` at a time, sharing loaded weights."""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from .job import _INPUT_ERRORS, JobResult, _preview_dir, run_job
from .jobs import Job
from .progress import BatchProgress


class _Models:
    """Loaded models shared by the worker threads; dropped once no remaining job needs them."""

    def __init__(self, jobs: list[Job]) -> None:
        self.lock = threading.Lock()
        self.loaded: dict[tuple, Any] = {}
        self.remaining: dict[tuple, int] = {}
        for j in jobs:
            key = self.key(j)
            self.remaining[key] = self.remaining.get(key, 0) + 1

    @staticmethod
    def key(job: Job) -> tuple:
        return (job.model, job.cfg.device, job.cfg.dtype)

    def get(self, job: Job):
        from ..model import load_model

        key = self.key(job)
        with self.lock:
            if key not in self.loaded:
                self.loaded[key] = load_model(job.model, job.cfg.device, job.cfg.dtype)
            return self.loaded[key]

    def release(self, job: Job) -> None:
        key = self.key(job)
        with self.lock:
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                self.loaded.pop(key, None)


def render_local(
    jobs: list[Job],
    *,
    parallel: int = 1,
    resume: bool = False,
    save_state: bool = True,
    state_every: float = 0.0,
    preview: str | Path | None = None,
    progress: bool = True,
    measure_each: bool = False,
) -> list[JobResult]:
    """Renders the jobs in this process, `parallel` at a time (threads sharing loaded weights)."""
    from ..engine import Engine
    from ..memory import PeakMeter

    models = _Models(jobs)
    bars = BatchProgress(jobs, disable=not progress)
    results: dict[int, JobResult] = {}
    stop = threading.Event()  # Ctrl-C: running jobs stop after their current chunk (their state is saved)

    def progress_of(job: Job) -> Callable[[int], None]:
        def update(n: int) -> None:
            bars.update(job.name, n)
            if stop.is_set():
                raise KeyboardInterrupt
        return update

    def work(job: Job) -> JobResult:
        try:
            bars.start(job)
            meter = PeakMeter(job.cfg.device) if measure_each else None
            if meter:
                meter.reset()
            try:
                engine = Engine(models.get(job), job.cfg.attention)
            except Exception as exc:
                return JobResult(job.name, False, 0, job.cfg.frames, 0.0, reason=str(exc),
                                 error_type=type(exc).__name__, input_error=isinstance(exc, _INPUT_ERRORS))
            result = run_job(job, engine, resume=resume, save_state=save_state, state_every=state_every,
                             preview=_preview_dir(preview, job), on_progress=progress_of(job))
            if meter:
                result.peak_bytes = meter.peak()
            return result
        finally:
            models.release(job)

    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="arvideo-job")
    try:
        futures = {pool.submit(work, j): j for j in jobs}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = futures[fut]
                results[job.index] = fut.result()
                bars.finish(job, results[job.index])
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        bars.close()
    return [results[j.index] for j in jobs]
