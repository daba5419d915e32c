"""Batch progress display: one bar for the batch above one bar per running job."""
from __future__ import annotations

import threading
from typing import Any

from .job import JobResult
from .jobs import Job


class BatchProgress:
    """A batch bar (frames of all jobs, jobs done, frames/s, time left) above one bar per running job."""

    def __init__(self, jobs: list[Job], disable: bool = False) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.disable = disable
        self.total_jobs = len(jobs)
        self.done_jobs = self.failed = 0
        self.lock = threading.Lock()
        self.bar = tqdm(total=sum(j.cfg.frames for j in jobs), unit="frame", disable=disable, position=0,
                        desc=self._desc(), dynamic_ncols=True)
        self.job_bars: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def _desc(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"batch: {self.done_jobs}/{self.total_jobs} jobs done{failed}"

    def start(self, job: Job) -> None:
        """Shows a bar for `job` in the first free row."""
        with self.lock:
            if job.name in self.job_bars:
                return
            used = {slot for slot, _ in self.job_bars.values()}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            bar = self._tqdm(total=job.cfg.frames, unit="frame", desc=job.name, leave=False,
                             position=slot + 1, disable=self.disable, dynamic_ncols=True)
            done = self.counts.setdefault(job.name, 0)
            bar.update(done)
            self.job_bars[job.name] = (slot, bar)

    def update(self, name: str, frames_done: int) -> None:
        with self.lock:
            delta = frames_done - self.counts.get(name, 0)
            if delta <= 0:
                return
            self.counts[name] = frames_done
            self.bar.update(delta)
            if name in self.job_bars:
                self.job_bars[name][1].update(delta)

    def finish(self, job: Job, result: JobResult) -> None:
        with self.lock:
            self.done_jobs += 1
            self.failed += not result.ok
            # a failed or shorter job will not make its remaining frames: take them off the total
            missing = job.cfg.frames - self.counts.get(job.name, 0)
            if missing > 0 and self.bar.total:
                self.bar.total -= missing
            entry = self.job_bars.pop(job.name, None)
            if entry is not None:
                entry[1].close()
            self.bar.set_description_str(self._desc())
            self.bar.refresh()

    def close(self) -> None:
        for _, bar in self.job_bars.values():
            bar.close()
        self.bar.close()
