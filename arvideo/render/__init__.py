"""Batch rendering: a jobs file in, one video per job out; crash-safe, memory-bounded, optionally on Ray.

A job runs as `run_job`: stream the engine's chunks into the job's outputs, save a resumable
`JobState` next to the first output (`OUT.arvideo-state`) each time a chunk has been
written, and on success rename the outputs into place and delete the state.

Files while a job runs, and after it ends:

| output | while running | done | failed |
|---|---|---|---|
| `.mp4` | `name.mp4`, fragmented, playable | `name.mp4` | `name.partial.mp4` (playable, frames so far) |
| `.npy` | `name.partial.npy` (valid while it grows) | `name.npy` | removed |
| `.gif` | in memory (`name.partial.gif` at the end) | `name.gif` | removed |
| `dir/` | `dir/frame_000000.png`, ... (each atomic) | `dir/` | frames removed |

`arvideo generate` uses the same code with `atomic=False`: its `.npy` grows under its final
name and a failed run keeps what it wrote, as before.

Resuming (`resume=True`) continues from the state file: the run's outputs are first cut
back to the state's `emitted_frames` (a kill can land after a chunk was written but before
its snapshot, or in the middle of writing one): `.npy` is truncated and its header
rewritten; `.mp4` is re-muxed packet for packet (no re-encoding: its first frames stay
bit-identical) into a new file that replaces the old one once those packets are in, and
the encoder continues from there (a fresh H.264 encoder, so it starts with a keyframe).
An mp4 killed mid-run holds every frame but the newest, so the state carries the last
chunk's frames too, and any frame the mp4 lacks is re-encoded from them. A PNG directory
loses its frames past the cut; a GIF (held in memory) cannot be resumed. A state whose
request does not match is an error; so is a state found without `resume=True`.

Modules, one concept each: `jobs` (the jobs file), `state` (state files), `resume` (cutting
outputs back and continuing them), `outputs` (`JobOutputs`), `job` (`run_job`, `JobResult`),
`progress` (`BatchProgress`), `local` (`render_local`), `ray_runner` (`render_ray`), `plan`
(memory planning) and `summary` (`summary_table`). Everything is importable from here.
"""
from __future__ import annotations

import logging

from .job import _INPUT_ERRORS as _INPUT_ERRORS
from .job import JobResult, run_job
from .job import _preview_dir as _preview_dir
from .jobs import _JOB_ONLY_KEYS as _JOB_ONLY_KEYS
from .jobs import _TOP_KEYS as _TOP_KEYS
from .jobs import JOB_KEYS, Job, check_output_path, load_jobs, validate_jobs
from .jobs import _as_list as _as_list
from .jobs import _job_values as _job_values
from .jobs import _meta_engine as _meta_engine
from .jobs import _set_nested as _set_nested
from .local import _Models as _Models
from .local import render_local
from .outputs import JobOutputs
from .outputs import _kind as _kind
from .outputs import _partial_name as _partial_name
from .plan import describe_plan, plan_jobs
from .progress import BatchProgress
from .ray_runner import _WORKER_MODEL as _WORKER_MODEL
from .ray_runner import _ray_task as _ray_task
from .ray_runner import _Reporter as _Reporter
from .ray_runner import _worker_engine as _worker_engine
from .ray_runner import render_ray
from .resume import _annexb as _annexb
from .resume import _resume_mp4 as _resume_mp4
from .resume import _resume_npy as _resume_npy
from .resume import _resume_png_dir as _resume_png_dir
from .resume import remove_resume_leftovers
from .state import STATE_SUFFIX, JobState, load_job_state, stale_states, state_path_for
from .summary import summary_table

log = logging.getLogger(__name__)

__all__ = [
    "JOB_KEYS",
    "STATE_SUFFIX",
    "BatchProgress",
    "Job",
    "JobOutputs",
    "JobResult",
    "JobState",
    "check_output_path",
    "describe_plan",
    "load_job_state",
    "load_jobs",
    "plan_jobs",
    "remove_resume_leftovers",
    "render_local",
    "render_ray",
    "run_job",
    "stale_states",
    "state_path_for",
    "summary_table",
    "validate_jobs",
]
