"""The Ray runner: every job a Ray task that writes its own outputs and reports progress to the driver."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .job import _INPUT_ERRORS, JobResult, _preview_dir, run_job
from .jobs import Job
from .local import _Models
from .progress import BatchProgress

log = logging.getLogger(__name__)

_WORKER_MODEL: dict[tuple, Any] = {}  # per Ray worker process: the last model loaded (reused across tasks)


def _worker_engine(job: Job):
    from ..engine import Engine
    from ..model import load_model

    key = _Models.key(job)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        _WORKER_MODEL[key] = load_model(job.model, job.cfg.device, job.cfg.dtype)
    return Engine(_WORKER_MODEL[key], job.cfg.attention)


def _ray_task(job: Job, options: dict, reporter) -> JobResult:
    """Runs on a Ray worker: writes the job's outputs itself and reports progress to the driver."""
    from ..memory import PeakMeter

    meter = PeakMeter(job.cfg.device)
    meter.reset()
    last = [0.0]

    def on_progress(n: int) -> None:
        now = time.monotonic()
        if reporter is not None and (now - last[0] > 0.2 or n >= job.cfg.frames):
            reporter.update.remote(job.name, n)
            last[0] = now

    try:
        engine = _worker_engine(job)
    except Exception as exc:
        return JobResult(job.name, False, 0, job.cfg.frames, 0.0, reason=str(exc), error_type=type(exc).__name__,
                         input_error=isinstance(exc, _INPUT_ERRORS))
    # a retried task (the previous worker was lost) continues from the state that worker saved
    result = run_job(job, engine, resume=True, save_state=options["save_state"], state_every=options["state_every"],
                     preview=_preview_dir(options["preview"], job), on_progress=on_progress)
    result.peak_bytes = meter.peak()
    return result


class _Reporter:
    """Ray actor collecting per-job progress from the workers."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}

    def update(self, name: str, frames: int) -> None:
        self.frames[name] = max(frames, self.frames.get(name, 0))

    def snapshot(self) -> dict[str, int]:
        return dict(self.frames)


def render_ray(
    jobs: list[Job],
    *,
    address: str | None = None,
    cpus_per_job: float = 1.0,
    gpus_per_job: float | None = None,
    memory_per_job: list[int] | None = None,
    retries: int = 3,
    save_state: bool = True,
    state_every: float = 0.0,
    preview: str | Path | None = None,
    progress: bool = True,
) -> list[JobResult]:
    """Renders every job as a Ray task on the cluster at `address` (None: a local Ray).

    Each task asks for `cpus_per_job` CPUs and `gpus_per_job` GPUs (default: 1 for CUDA
    jobs, else 0) and, when given, `memory_per_job` bytes of Ray's memory resource; Ray
    retries a task whose worker died up to `retries` times, and the retry resumes from the
    state the lost worker saved. Workers write the outputs themselves: on a cluster the
    output paths must be on storage every node sees.
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs Ray: pip install 'arvideo[ray]' (or pip install 'ray>=2.40')") from exc

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                  "log_to_driver": log.isEnabledFor(logging.INFO)}
        ray.init(address=None if address in (None, "local") else address, **kwargs)
        started = True
    try:
        reporter = ray.remote(num_cpus=0)(_Reporter).remote()
        task = ray.remote(_ray_task)
        refs = {}
        options = {"save_state": save_state, "state_every": state_every,
                   "preview": str(preview) if preview is not None else None}
        for j in jobs:
            gpus = gpus_per_job if gpus_per_job is not None else (1.0 if str(j.cfg.device).startswith("cuda") else 0.0)
            opts: dict[str, Any] = {"num_cpus": cpus_per_job, "num_gpus": gpus, "max_retries": retries,
                                    "retry_exceptions": False}
            if memory_per_job is not None:
                opts["memory"] = int(memory_per_job[j.index])
            refs[task.options(**opts).remote(j, options, reporter)] = j
        bars = BatchProgress(jobs, disable=not progress)
        by_name = {j.name: j for j in jobs}
        results: dict[int, JobResult] = {}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                try:
                    for name, n in ray.get(reporter.snapshot.remote()).items():
                        if by_name[name].index not in results:
                            bars.start(by_name[name])
                            bars.update(name, n)
                except ray.exceptions.RayError:
                    pass
                for ref in ready:
                    job = refs[ref]
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        result = JobResult(job.name, False, 0, job.cfg.frames, 0.0, error_type=type(exc).__name__,
                                           reason=f"Ray task failed after {retries} retries: {str(exc).splitlines()[0]}")
                    results[job.index] = result
                    bars.update(job.name, result.frames)
                    bars.finish(job, result)
        finally:
            bars.close()
        return [results[j.index] for j in jobs]
    finally:
        if started:
            ray.shutdown()
