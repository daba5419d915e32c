"""State files: the resumable `JobState` a running job keeps next to its first output (`OUT.arvideo-state`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..state import RunState

if TYPE_CHECKING:
    from .jobs import Job

STATE_SUFFIX = ".arvideo-state"


def state_path_for(outputs: list[Path]) -> Path:
    """Where a run writing `outputs` keeps its resumable state."""
    first = Path(outputs[0])
    return first.with_name(first.name.rstrip("/\\") + STATE_SUFFIX)


def stale_states(jobs: list[Job]) -> list[Path]:
    """State files left by interrupted runs of these jobs."""
    return [j.state_path for j in jobs if j.state_path.exists()]


@dataclass
class JobState(RunState):
    """The engine's RunState plus what the outputs need to be cut back and continued."""

    tail_start: int = 0
    tail: np.ndarray | None = field(default=None, repr=False)  # frames [tail_start, emitted_frames)
    outputs: list[str] = field(default_factory=list)

    @classmethod
    def wrap(cls, state: RunState, tail_start: int, tail: np.ndarray, outputs: list[Path]) -> JobState:
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
