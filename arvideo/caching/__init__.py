"""Per-chunk cache policies, selected by preset name (`--cache PRESET`)."""
from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from .base import CachePolicy
from .none import NoCache

POLICIES: dict[str, Callable[..., CachePolicy]] = {"none": NoCache}


def make_policy_factory(preset: str, steps: int) -> Callable[[], CachePolicy]:
    """Returns a factory that makes one fresh policy per chunk."""
    if preset not in POLICIES:
        raise ConfigError(f"unknown cache preset {preset!r}; available: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[preset]
    return lambda: cls()


__all__ = ["CachePolicy", "NoCache", "POLICIES", "make_policy_factory"]
