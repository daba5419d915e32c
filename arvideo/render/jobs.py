"""The jobs file: `Job`, reading and validating a YAML jobs file, checking output paths."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import VALID_KEYS, GenerateConfig, build_config
from ..errors import ConfigError, ModelFolderError
from .state import state_path_for

_TOP_KEYS = [f.name for f in fields(GenerateConfig)]
_JOB_ONLY_KEYS = ["name", "out", "model", "config", "steps", "guidance"]
JOB_KEYS = _JOB_ONLY_KEYS + [k for k in _TOP_KEYS if k not in _JOB_ONLY_KEYS]


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


def check_output_path(text: str) -> None:
    """Raises ConfigError unless `text` names an output `open_sink` accepts."""
    from ..sinks import SUPPORTED

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
    from ..caching import make_policy_factory

    engines: dict[str | None, Any] = {}
    for job in jobs:
        engine = _meta_engine(engines, job.model)
        if engine is None:
            continue
        try:
            r = engine.resolve(job.cfg)
            engine.make_schedule(r)
            engine.section_plan(r)
            make_policy_factory(r.cfg.cache.preset, r.steps, engine.model.path)
        except ConfigError as exc:
            raise ConfigError(f"job {job.index + 1} ({job.name}): {exc}") from exc


def _meta_engine(engines: dict, model: str | None):
    """An engine over the model's configs only (no weights), cached per model; None if the folder is bad."""
    from ..engine import Engine
    from ..memory import meta_bundle

    if model not in engines:
        try:
            engines[model] = Engine(meta_bundle(model))
        except ModelFolderError:
            engines[model] = None
    return engines[model]
