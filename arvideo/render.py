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
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import VALID_KEYS, GenerateConfig, build_config
from .errors import ConfigError, ModelFolderError, PromptError
from .state import RunState

log = logging.getLogger(__name__)

STATE_SUFFIX = ".arvideo-state"
_TOP_KEYS = [f.name for f in fields(GenerateConfig)]
_JOB_ONLY_KEYS = ["name", "out", "model", "config", "steps", "guidance"]
JOB_KEYS = _JOB_ONLY_KEYS + [k for k in _TOP_KEYS if k not in _JOB_ONLY_KEYS]
_INPUT_ERRORS = (ConfigError, PromptError, ModelFolderError)


# -- jobs ------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One video of a batch: its full request, where it goes, which model makes it."""

    index: int
    name: str
    cfg: GenerateConfig
    outputs: list[Path]
    model: str | None = None
    kv_default: bool = True  # kv.policy left to the model default (the planner may bound it)

    @property
    def state_path(self) -> Path:
        return state_path_for(self.outputs)


def state_path_for(outputs: list[Path]) -> Path:
    """Where a run writing `outputs` keeps its resumable state."""
    first = Path(outputs[0])
    return first.with_name(first.name.rstrip("/\\") + STATE_SUFFIX)


def check_output_path(text: str) -> None:
    """Raises ConfigError unless `text` names an output `open_sink` accepts."""
    from .sinks import SUPPORTED

    path = Path(text)
    if text.endswith(("/", "\\")) or path.is_dir() or not path.suffix:
        return
    if path.suffix.lower() not in (".mp4", ".gif", ".npy"):
        hint = " (for PNG frames give a directory such as 'frames/')" if path.suffix.lower() == ".png" else ""
        raise ConfigError(f"unsupported output '{text}': supported are {', '.join(SUPPORTED)}{hint}")


def _set_nested(values: dict, dotted: str, value: Any) -> None:
    node = values
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is both a value and a section")
    node[last] = value


def _job_values(raw: dict, where: str) -> tuple[dict, dict]:
    """Splits a job mapping into build_config values (nested) and job-only settings."""
    values: dict[str, Any] = {}
    special: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in ("name", "out", "model", "config"):
            special[key] = value
        elif key == "steps":
            _set_nested(values, "sampler.steps", value)
        elif key == "guidance":
            values["guidance_scale"] = value
        elif key in ("schedule", "cache") and isinstance(value, str):
            _set_nested(values, "schedule.name" if key == "schedule" else "cache.preset", value)
        elif key in _TOP_KEYS:
            if isinstance(value, dict):
                for sub, v in value.items():
                    _set_nested(values, f"{key}.{sub}", v)
            else:
                values[key] = value
        elif key in VALID_KEYS:
            _set_nested(values, key, value)
        else:
            raise ConfigError(
                f"{where}: unknown key {key!r}; valid keys: {', '.join(JOB_KEYS)}, or any dotted setting "
                f"({', '.join(k for k in VALID_KEYS if '.' in k)})"
            )
    return values, special


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def load_jobs(
    path: str | Path,
    *,
    out_dir: str | Path | None = None,
    model: str | None = None,
    configs: list[str] | None = None,
    overrides: list[str] | None = None,
) -> list[Job]:
    """Reads and validates every job of a YAML jobs file; raises ConfigError naming the job.

    The file is a list of job mappings, or a mapping with `jobs:` (that list) and optional
    `defaults:` (settings every job starts from). A job is `prompt`, `frames`, `seed`, `out`
    (a path or a list of paths; relative ones land in `out_dir`) plus any generate setting:
    `model`, `steps`, `guidance`, `schedule`, `cache`, `config` (YAML files), any
    GenerateConfig key, nested (`kv: {policy: window}`) or dotted (`kv.policy: window`).
    Command-line `configs` and `overrides` apply to every job, under the job's own settings.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"jobs file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read jobs file {path}: {exc}") from exc
    defaults: dict = {}
    if isinstance(data, dict):
        unknown = set(data) - {"jobs", "defaults"}
        if unknown or "jobs" not in data:
            raise ConfigError(f"{path}: a jobs file is a list of jobs, or a mapping with 'jobs:' "
                              f"and optional 'defaults:'; found keys {sorted(map(str, data))}")
        defaults = data.get("defaults") or {}
        data = data["jobs"]
        if not isinstance(defaults, dict):
            raise ConfigError(f"{path}: 'defaults:' must be a mapping of job settings")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of jobs (each a mapping with prompt, frames, seed, out)")
    base = Path(out_dir) if out_dir is not None else Path.cwd()
    jobs: list[Job] = []
    seen_outputs: dict[Path, str] = {}
    seen_names: set[str] = set()
    for i, raw in enumerate(data):
        where = f"{path.name}: job {i + 1}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a job is a mapping (prompt: ..., frames: ..., out: ...), got {raw!r}")
        merged = {**defaults, **raw}
        values, special = _job_values(merged, where)
        prompt = values.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: 'prompt' is missing or empty")
        job_configs = [str((path.parent / c) if not Path(c).is_absolute() else c) for c in _as_list(special.get("config"))]
        try:
            cfg = build_config(list(configs or []) + job_configs, list(overrides or []), **values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        outs = _as_list(special.get("out")) or [f"job-{i + 1:03d}.mp4"]
        resolved = []
        for text in outs:
            try:
                check_output_path(text)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            p = Path(text).expanduser()
            p = (p if p.is_absolute() else base / p).absolute()
            if p in seen_outputs:
                raise ConfigError(f"{where}: output {p} is also written by {seen_outputs[p]}")
            seen_outputs[p] = where
            resolved.append(p)
        name = str(special.get("name") or resolved[0].stem)
        unique, n = name, 2
        while unique in seen_names:
            unique, n = f"{name}-{n}", n + 1
        seen_names.add(unique)
        job_model = model
        if special.get("model") is not None:  # relative to the jobs file, like its config files
            p = Path(str(special["model"])).expanduser()
            job_model = str(p if p.is_absolute() else path.parent / p)
        jobs.append(Job(i, unique, cfg, resolved, job_model, kv_default=cfg.kv.policy is None))
    return jobs


def validate_jobs(jobs: list[Job]) -> None:
    """Resolves every job against its model's configs (meta device: no weights loaded).

    Raises ConfigError naming the first job whose settings the engine would refuse. Jobs
    whose model folder is missing are left to fail when they run (failure isolation).
    """
    from .caching import make_policy_factory

    engines: dict[str | None, Any] = {}
    for job in jobs:
        engine = _meta_engine(engines, job.model)
        if engine is None:
            continue
        try:
            r = engine.resolve(job.cfg)
            engine.make_schedule(r)
            make_policy_factory(r.cfg.cache.preset, r.steps, engine.model.path)
        except ConfigError as exc:
            raise ConfigError(f"job {job.index + 1} ({job.name}): {exc}") from exc


def stale_states(jobs: list[Job]) -> list[Path]:
    """State files left by interrupted runs of these jobs."""
    return [j.state_path for j in jobs if j.state_path.exists()]


# -- resumable state -----------------------------------------------------------------------------
@dataclass
class JobState(RunState):
    """The engine's RunState plus what the outputs need to be cut back and continued."""

    tail_start: int = 0
    tail: np.ndarray | None = field(default=None, repr=False)  # frames [tail_start, emitted_frames)
    outputs: list[str] = field(default_factory=list)

    @classmethod
    def wrap(cls, state: RunState, tail_start: int, tail: np.ndarray, outputs: list[Path]) -> "JobState":
        base = {f.name: getattr(state, f.name) for f in fields(RunState)}
        return cls(**base, tail_start=tail_start, tail=tail, outputs=[str(p) for p in outputs])


def load_job_state(path: Path, outputs: list[Path]) -> JobState:
    state = RunState.load(path)
    if not isinstance(state, JobState):
        raise ConfigError(f"{path} is an engine snapshot without output information; delete it to start over")
    if state.outputs != [str(p) for p in outputs]:
        raise ConfigError(f"{path} belongs to a run writing {', '.join(state.outputs)}, not {', '.join(map(str, outputs))}; "
                          "repeat the original outputs or delete the state to start over")
    return state


# -- outputs ---------------------------------------------------------------------------------------
def _kind(path: Path) -> str:
    text = str(path)
    if text.endswith(("/", "\\")) or path.is_dir() or not path.suffix:
        return "dir"
    return path.suffix.lower()[1:]


def _partial_name(path: Path) -> Path:
    return path.with_name(path.stem + ".partial" + path.suffix)


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

    from .sinks import Mp4Sink

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
    from .sinks import NpySink
    from .sinks.npy import npy_header

    class _Appending(NpySink):
        def __init__(self, p: Path, held: int) -> None:
            super().__init__(p)
            self._file = open(p, "r+b")  # noqa: SIM115 - held open until close()
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
    from .sinks import PngDirSink

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
        from .sinks import open_sink

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
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - close every sink, then report
                errors.append(exc)
        if errors:
            raise errors[0]

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
            except Exception:  # noqa: BLE001 - the job's own error is the one to report
                pass
            return [p for p in self.paths if p.exists()]
        left = []
        for p, sink in zip(self.paths, self.sinks):
            kind = _kind(p)
            if kind != "gif":  # closing a GifSink would rename it into place
                try:
                    sink.close()
                except Exception:  # noqa: BLE001 - a failed output is discarded anyway
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


# -- one job ------------------------------------------------------------------------------------------
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
    from .preview import LatentProjection, PreviewWriter

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
    except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the batch
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


# -- batches ------------------------------------------------------------------------------------------
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
        from .model import load_model

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


def _preview_dir(preview: str | Path | None, job: Job) -> Path | None:
    return None if preview is None else Path(preview) / job.name


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
    from .engine import Engine
    from .memory import PeakMeter

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
            except Exception as exc:  # noqa: BLE001 - a missing or broken model fails this job only
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


# -- Ray -------------------------------------------------------------------------------------------------
_WORKER_MODEL: dict[tuple, Any] = {}  # per Ray worker process: the last model loaded (reused across tasks)


def _worker_engine(job: Job):
    from .engine import Engine
    from .model import load_model

    key = _Models.key(job)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        _WORKER_MODEL[key] = load_model(job.model, job.cfg.device, job.cfg.dtype)
    return Engine(_WORKER_MODEL[key], job.cfg.attention)


def _ray_task(job: Job, options: dict, reporter) -> JobResult:
    """Runs on a Ray worker: writes the job's outputs itself and reports progress to the driver."""
    from .memory import PeakMeter

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
    except Exception as exc:  # noqa: BLE001
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


# -- reporting -------------------------------------------------------------------------------------------
def summary_table(results: list[JobResult]) -> str:
    """A plain-text table of the batch, then one line per failure with its full reason."""
    from .memory import format_size

    show_peak = any(r.peak_bytes for r in results)
    head = ["job", "status", "frames", "time", *(["peak memory"] if show_peak else []), "output / reason"]
    rows = []
    for r in results:
        status = "ok" if r.ok else "FAILED"
        if r.ok and r.resumed_from:
            status = f"ok (resumed at {r.resumed_from})"
        where = ", ".join(r.outputs) if r.ok else f"{r.error_type}: {r.reason}"
        if len(where) > 90:
            where = where[:87] + "..."
        rows.append([r.name, status, f"{r.frames}/{r.total_frames}", f"{r.seconds:.1f} s",
                     *([format_size(r.peak_bytes) if r.peak_bytes else "-"] if show_peak else []), where])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + rows]
    ok = sum(r.ok for r in results)
    lines.append(f"{len(results)} jobs: {ok} done, {len(results) - ok} failed")
    for r in results:
        if not r.ok:
            kept = f" (kept: {', '.join(r.left)})" if r.left else " (no output written)"
            lines.append(f"failed: {r.name}: {r.error_type}: {r.reason}{kept}")
    return "\n".join(lines)


def describe_plan(plan, jobs: list[Job]) -> str:
    from .memory import format_size

    lines = []
    for job, jp in zip(jobs, plan.jobs):
        cap = f"; KV bounded to a {jp.kv_budget_frames}-latent-frame window to fit" if jp.kv_budget_frames else ""
        lines.append(f"  {job.name}: {jp.estimate.describe()}{cap}")
    bound = f" under --max-memory {format_size(plan.limit)}" if plan.limit else ""
    lines.insert(0, f"memory plan: {plan.parallel} job(s) at a time{bound}; estimated peak {format_size(plan.peak)} "
                    f"(process {format_size(plan.baseline)} + weights {format_size(plan.weights)} + jobs)")
    return "\n".join(lines)


def plan_jobs(jobs: list[Job], limit: int | None, max_parallel: int | None, *, baseline: int,
              separate_processes: bool = False, save_state: bool = True):
    """Estimates every job (meta device: no weights loaded) and plans KV caps and concurrency.

    Jobs whose model folder is missing are left out (they fail when run). With
    `separate_processes` (Ray) each job carries its own copy of the weights.
    Returns (plan, jobs with any KV caps applied).
    """
    from .memory import MemoryEstimate, estimate_request, plan_batch, weight_bytes, with_kv_cap

    engines: dict[str | None, Any] = {}
    weights: dict[tuple, int] = {}
    estimates: list[MemoryEstimate] = []
    for job in jobs:
        engine = _meta_engine(engines, job.model)
        if engine is None:
            estimates.append(MemoryEstimate(0, 0, 0, 0, 0, 0))
            continue
        key = (job.model, job.cfg.dtype)
        if key not in weights:
            weights[key] = weight_bytes(engine.model.path, job.cfg.dtype)
        est = estimate_request(engine, job.cfg, weights[key], save_state=save_state)
        if separate_processes:  # every worker holds its own weights: count them per job
            est = replace(est, other=est.other + est.weights)
        estimates.append(est)
    shared = {} if separate_processes else {str(k): v for k, v in weights.items()}
    cappable, mins, maxs = [], [], []
    for job in jobs:
        engine = engines[job.model]
        if engine is None:
            cappable.append(False), mins.append(1), maxs.append(1)
            continue
        r = engine.resolve(job.cfg)
        cappable.append(job.kv_default and r.cfg.kv.policy == "full" and r.cfg.schedule.name != "window")
        mins.append(r.block)
        maxs.append(r.latent_frames)

    def recap(i: int, frames: int):
        job = jobs[i]
        est = estimate_request(engines[job.model], with_kv_cap(job.cfg, frames), estimates[i].weights,
                               save_state=save_state)
        return replace(est, other=est.other + est.weights) if separate_processes else est

    plan = plan_batch(estimates, shared, limit, baseline, max_parallel, recap=recap, cappable=cappable,
                      min_frames=mins, max_frames=maxs)
    capped = [replace(j, cfg=with_kv_cap(j.cfg, jp.kv_budget_frames)) if jp.kv_budget_frames else j
              for j, jp in zip(jobs, plan.jobs)]
    return plan, capped


def remove_resume_leftovers(jobs: list[Job]) -> None:
    """Deletes temporary files of an interrupted re-mux (`name.mp4.resume`)."""
    for job in jobs:
        for p in job.outputs:
            leftover = p.with_name(p.name + ".resume")
            if leftover.exists():
                leftover.unlink()


def _meta_engine(engines: dict, model: str | None):
    """An engine over the model's configs only (no weights), cached per model; None if the folder is bad."""
    from .engine import Engine
    from .memory import meta_bundle

    if model not in engines:
        try:
            engines[model] = Engine(meta_bundle(model))
        except ModelFolderError:
            engines[model] = None
    return engines[model]
