"""Schedules: which chunks are in flight at which noise level, tick by tick."""
from __future__ import annotations

import inspect
from typing import Any

from arvideo.errors import ConfigError
from arvideo.schedules.base import Schedule, Tick
from arvideo.schedules.diffusion_forcing import DiffusionForcingSchedule, timestep_index_matrix
from arvideo.schedules.pipelined import PipelinedSchedule

SCHEDULES: dict[str, type] = {
    "diffusion-forcing": DiffusionForcingSchedule,
    "pipelined": PipelinedSchedule,
}


def build_schedule(name: str, **kwargs: Any) -> Schedule:
    """Builds the schedule registered under `name` from its constructor arguments."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; valid names: {', '.join(sorted(SCHEDULES))}")
    cls = SCHEDULES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    accepted = [p.name for p in params]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"schedule {name!r} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}"
        )
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(f"schedule {name!r} needs {', '.join(missing)}")
    return cls(**kwargs)


__all__ = [
    "SCHEDULES",
    "DiffusionForcingSchedule",
    "PipelinedSchedule",
    "Schedule",
    "Tick",
    "build_schedule",
    "timestep_index_matrix",
]
