"""Per-chunk cache policies, selected by preset name (`--cache PRESET`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .base import CachePolicy, PolicyContext, PolicyFactory
from .none import NoCache


class _Factory:
    def __init__(self, cls, may_skip: bool, **kwargs) -> None:
        self.cls, self.may_skip, self.kwargs = cls, may_skip, kwargs

    def __call__(self, ctx: PolicyContext) -> CachePolicy:
        return self.cls(ctx, **self.kwargs)


PRESETS = {"none": lambda steps, model_dir: _Factory(NoCache, False)}


def make_policy_factory(preset: str, steps: int, model_dir: Path | None = None) -> PolicyFactory:
    """A factory making one fresh policy per chunk for the named preset."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown cache preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset](steps, model_dir)


__all__ = ["CachePolicy", "NoCache", "PolicyContext", "PolicyFactory", "PRESETS", "make_policy_factory"]
