"""Structured configs (dataclasses, loaded and merged with omegaconf).

A value of None means "the model folder's default" (its `arvideo.json`), then the built-in
default below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from .errors import ConfigError


@dataclass
class ScheduleConfig:
    """Which chunks are in flight at which noise level."""

    name: str = "diffusion-forcing"  # diffusion-forcing | pipelined | window
    causal_block_size: int | None = None  # latent frames per chunk
    ar_step: int | None = None  # 0 = synchronous
    window_blocks: int | None = None  # sync: chunks denoised together; async: in-flight bound
    window_size: int = 4  # pipelined: chunks in flight
    # window mode (bidirectional checkpoints, diffusers' long-video behaviour), in video frames
    base_num_frames: int | None = None
    overlap_history: int | None = None
    addnoise_condition: float = 0.0


@dataclass
class SamplerConfig:
    name: str | None = None  # unipc | euler
    steps: int | None = None
    shift: float | None = None
    grid: str = "linear"  # linear | magi (euler only)


@dataclass
class CacheConfig:
    preset: str = "none"


@dataclass
class KVConfig:
    policy: str | None = None  # full | window | sink-window | scored (model default, else full)
    budget_frames: int | None = None  # latent frames of context kept (bounded policies); tokens = frames x tokens per frame
    commit: str = "clean"  # clean: re-run a finished chunk at the context timestep; last-step: keep its last step's K/V
    context_noise: float | None = None  # timestep (0..1000) finished chunks are re-run at
    positions: str | None = None  # absolute | reindexed (cached frames re-positioned by rank); model default, else reindexed
    score_lambda: float = 0.07  # scored: weight of importance against redundancy
    pool_width: int | None = None  # scored: max-pool width of importance along token order (model default, else 7)
    queries: str = "chunk"  # scored: chunk (every query being denoised) | last-frame (their last latent frame)
    protect_sink: bool = True  # scored: always keep the first chunk
    protect_recent: bool = True  # scored: always keep the most recently committed chunk
    evict_unit: str = "token"  # scored: keep the best tokens per head (token) or whole latent frames (frame)
    section_sink: str = "move"  # scored/sink-window, prompt sections: the sink moves to each section's first chunk (move) or stays the video's first (keep)


@dataclass
class PromptSection:
    """A prompt that takes over from `frame` on (a video frame; or `seconds`, converted at the
    request's fps); it starts at the first chunk boundary at or after that frame (arvideo/sections.py)."""

    frame: int | None = None
    prompt: str = ""
    seconds: float | None = None


@dataclass
class GenerateConfig:
    """Everything one video needs."""

    prompt: str = ""  # the prompt from frame 0 (until the first of `sections`)
    negative_prompt: str = ""
    sections: list[PromptSection] = field(default_factory=list)  # later prompts, by start frame
    frames: int = 48
    seed: int = 0
    fps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attention: str = "auto"  # auto | sdpa | flash
    decode_ahead: bool = True  # decode finished chunks on a background thread while generation goes on
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    kv: KVConfig = field(default_factory=KVConfig)


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _valid_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


VALID_KEYS = _valid_keys(GenerateConfig)


def build_config(
    yaml_paths: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    **values: Any,
) -> GenerateConfig:
    """Merges YAML files, then `key=value` overrides, then keyword values into a GenerateConfig."""
    base = OmegaConf.structured(GenerateConfig)
    try:
        for path in yaml_paths or []:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            try:
                loaded = OmegaConf.load(p)
            except Exception as exc:  # yaml errors carry their own line numbers
                raise ConfigError(f"cannot read config {p}: {exc}") from exc
            base = OmegaConf.merge(base, loaded)
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not key=value; valid keys: {', '.join(VALID_KEYS)}")
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        if values:
            base = OmegaConf.merge(base, OmegaConf.create({k: v for k, v in values.items() if v is not None}))
    except (ConfigAttributeError, ConfigKeyError) as exc:
        key = getattr(exc, "full_key", None) or str(exc).split("\n")[0]
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(VALID_KEYS)}") from exc
    except ValidationError as exc:
        raise ConfigError(f"invalid config value: {str(exc).splitlines()[0]} (key {exc.full_key})") from exc
    cfg: GenerateConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    return cfg


# Numeric settings that must lie in a range when they are set. None (unset) means the model's default,
# so a 0 or a negative value must be an error: taken as "unset" it would silently run the default.
# key -> (lowest allowed, highest allowed or None, what the value is)
RANGES: dict[str, tuple[float, float | None, str]] = {
    "fps": (1, None, "frames per second of the output"),
    "height": (1, None, "pixels"),
    "width": (1, None, "pixels"),
    "sampler.steps": (1, None, "sampling steps"),
    "sampler.shift": (1e-6, None, "the flow-matching sigma shift"),
    "schedule.causal_block_size": (1, None, "latent frames per chunk"),
    "schedule.window_blocks": (1, None, "chunks denoised together"),
    "schedule.window_size": (1, None, "chunks in flight"),
    "schedule.base_num_frames": (1, None, "video frames per window"),
    "schedule.overlap_history": (0, None, "video frames"),
    "schedule.addnoise_condition": (0, 1000, "a timestep"),
    "kv.budget_frames": (1, None, "latent frames of context"),
    "kv.context_noise": (0, 1000, "a timestep"),
}


def check_ranges(cfg: GenerateConfig) -> None:
    """Raises ConfigError naming the first set value that is out of its range (RANGES)."""
    for key, (lo, hi, what) in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        if value < lo or (hi is not None and value > hi):
            span = f"in [{lo:g}, {hi:g}]" if hi is not None else ("> 0" if lo < 1 else f">= {lo:g}")
            raise ConfigError(f"{key} must be {span} ({what}), got {value:g}; leave it unset for the model's default")


def to_dict(cfg: GenerateConfig) -> dict[str, Any]:
    return asdict(cfg)
