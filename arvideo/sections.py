"""Prompt sections: a long video whose prompt changes at given frames.

A request's `prompt` holds from frame 0; each `PromptSection(frame, prompt)` takes over from
its frame on. A chunk is denoised under one prompt, the one in force at its first video frame,
so a change starts at the first chunk boundary at or after the requested frame (every
`causal_block_size x VAE temporal factor` frames: 4 for the embedded model). Chunks before a
change never depend on its prompt (attention is block-causal, and a later section's chunks do
not steer the KV store's eviction for them), and the new prompt sees them as context, so the
scene carries on rather than restarting (docs/sections.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .config import GenerateConfig
from .errors import ConfigError


def first_video_frame(latent_frame: int, temporal_factor: int) -> int:
    """First video frame decoded from `latent_frame` (latent 0 gives one frame, each later one tf)."""
    return 0 if latent_frame == 0 else (latent_frame - 1) * temporal_factor + 1


@dataclass(frozen=True)
class SectionPlan:
    """Which prompt every chunk is denoised under."""

    prompts: tuple[str, ...]  # prompts[0] = the request's prompt
    starts: tuple[int, ...]  # requested start frame of each prompt (starts[0] = 0)
    temporal_factor: int
    chunk_starts: tuple[int, ...]  # first latent frame of every chunk of the request
    chunk_sections: tuple[int, ...] = ()  # prompt index of every chunk (filled by from_config)

    @classmethod
    def from_config(cls, cfg: GenerateConfig, temporal_factor: int, chunk_starts: list[int],
                    fps: float) -> SectionPlan:
        """chunk_starts: the first latent frame of every chunk of the request, in order; fps: the
        request's frame rate (sections given in seconds start at round(seconds x fps))."""
        prompts, starts = [cfg.prompt], [0]
        for n, sec in enumerate(cfg.sections):
            if (sec.frame is None) == (sec.seconds is None):
                raise ConfigError(f"sections[{n}]: give either frame or seconds (got frame={sec.frame}, "
                                  f"seconds={sec.seconds})")
            frame = sec.frame if sec.frame is not None else round(sec.seconds * fps)
            where = f"sections[{n}] (frame {frame}" + (f" = {sec.seconds} s at {fps:g} fps)" if sec.frame is None else ")")
            if not sec.prompt.strip():
                raise ConfigError(f"{where} has an empty prompt")
            if not 0 < frame < cfg.frames:
                raise ConfigError(f"{where}: a section must start after frame 0 and before the video ends "
                                  f"(frames={cfg.frames}); put the first prompt in `prompt`")
            if frame <= starts[-1]:
                raise ConfigError(f"{where}: sections must be in increasing frame order "
                                  f"(the previous one starts at frame {starts[-1]})")
            prompts.append(sec.prompt)
            starts.append(frame)
        plan = cls(tuple(prompts), tuple(starts), temporal_factor, tuple(chunk_starts))
        plan = replace(plan, chunk_sections=tuple(plan.section_of(c) for c in chunk_starts))
        # every section must own at least one chunk, or its prompt would silently never be used
        effective = plan.switch_frames()
        for n in range(1, len(starts)):
            if effective[n] is None:
                bounds = [first_video_frame(s, temporal_factor) for s in chunk_starts]
                raise ConfigError(
                    f"sections[{n - 1}] (frame {starts[n]}) gets no chunk of its own: a prompt holds for whole "
                    f"chunks and starts at the first chunk boundary at or after its frame (chunks start at frames "
                    f"{', '.join(map(str, bounds[:6]))}, ...); space sections further apart, or start this one "
                    f"at or before the last chunk's first frame ({bounds[-1]})"
                )
        return plan

    @property
    def sectioned(self) -> bool:
        return len(self.prompts) > 1

    def section_of(self, latent_start: int) -> int:
        """Index of the prompt a chunk starting at latent frame `latent_start` is denoised under."""
        frame = first_video_frame(latent_start, self.temporal_factor)
        return max(i for i, s in enumerate(self.starts) if s <= frame)

    def switch_frames(self) -> list[int | None]:
        """The video frame each prompt actually starts at (None: no chunk is denoised under it)."""
        out: list[int | None] = [None] * len(self.starts)
        for latent, i in zip(self.chunk_starts, self.chunk_sections):
            if out[i] is None:
                out[i] = first_video_frame(latent, self.temporal_factor)
        return out

    def openers(self) -> set[int]:
        """Indices of the chunks that open a section (the first chunk of every prompt but the first)."""
        c = self.chunk_sections
        return {i for i in range(1, len(c)) if c[i] != c[i - 1]}
