"""Engine: the tick loop. Streams each chunk's frames out the moment the chunk is clean.

Per tick the schedule names the chunks that take a step (and those to commit); each
active chunk's own cache policy decides whether it joins the backbone call; the joining
chunks (commits first) are packed into one call against the KV store; the sampler
advances every active chunk; finished chunks are decoded and handed out. Nothing here is
model-specific, and nothing holds all frames or all latents: finished chunks are dropped
once decoded and committed.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import CallPlan, WanFamilyBackbone
from .caching import PolicyContext, guidance_for, make_policy_factory, preset_sampler
from .caching.base import BackboneProbe
from .chunk import Chunk
from .config import GenerateConfig, check_ranges
from .decode_worker import Decoded, DecodeWorker
from .errors import ConfigError, NonFiniteError
from .kvstore import DEFAULT_POOL_WIDTH, EVICT_UNITS, KVStore
from .model import DTYPES, ModelBundle, load_model, require_prompt_encoder
from .samplers import Sampler
from .schedules import build_schedule
from .sections import SectionPlan
from .state import Run, RunState, request_fingerprint
from .vae import StreamingDecoder

log = logging.getLogger(__name__)

_GOLDEN = 0x9E3779B97F4A7C15


def chunk_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """Independent CPU generator per (seed, chunk, stream): noise does not depend on the schedule."""
    mixed = (seed * 1_000_003 + (index + 1) * _GOLDEN + stream * 0x5851F42D4C957F2D) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


@dataclass
class FrameChunk:
    """A finished chunk: its decoded frames (uint8 [n, H, W, 3]) and clean latents [1, C, f, h, w]."""

    index: int
    start: int
    frames: np.ndarray | None
    latents: torch.Tensor


@dataclass
class StepEvent:
    """Per-tick callback payload: every chunk that stepped, with its predicted clean latents."""

    tick: int
    chunks: list[tuple[int, int, torch.Tensor]]  # (chunk index, step taken, x0 [1, C, f, h, w])
    model_calls: int


@dataclass
class Resolved:
    """A request with every default filled in and validated."""

    cfg: GenerateConfig
    latent_frames: int
    latent_height: int
    latent_width: int
    channels: int
    steps: int
    guidance: float
    fps: int
    block: int
    context_noise: float


DECODE_QUEUE = 2  # finished chunks that may wait for the decoder before generation waits for it


class Engine:
    """Generates videos chunk by chunk from a loaded model."""

    def __init__(self, model: ModelBundle, attention: str = "auto") -> None:
        self.model = model
        self.backbone = WanFamilyBackbone(model.transformer, attention)
        self.decoder = StreamingDecoder(model.vae)
        self.model_calls = 0
        self._run: Run | None = None

    @classmethod
    def from_folder(cls, path=None, device: str = "cpu", dtype: str = "float32", attention: str = "auto") -> Engine:
        return cls(load_model(path, device, dtype), attention)

    # -- request resolution ---------------------------------------------------------------
    def resolve(self, cfg: GenerateConfig) -> Resolved:
        d = self.model.defaults
        tcfg = self.model.transformer.config
        s, tf = self.model.spatial_factor, self.model.temporal_factor
        if cfg.frames < 1:
            raise ConfigError(f"frames must be >= 1, got {cfg.frames}")
        check_ranges(cfg)
        height = cfg.height or d.get("height", 544)
        width = cfg.width or d.get("width", 960)
        unit = s * tcfg.patch_size[1]
        if height % unit or width % unit:
            raise ConfigError(
                f"height and width must be multiples of {unit} (VAE factor {s} x patch {tcfg.patch_size[1]}); "
                f"got {height}x{width}, try {height // unit * unit or unit}x{width // unit * unit or unit}"
            )
        if cfg.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
        sampler = replace(
            cfg.sampler,
            name=cfg.sampler.name or preset_sampler(cfg.cache.preset) or d.get("sampler", "unipc"),
            steps=cfg.sampler.steps or d.get("steps", 30),
            shift=cfg.sampler.shift if cfg.sampler.shift is not None
            else d.get("flow_shift", self.model.scheduler_config.get("flow_shift", 8.0)),
        )
        sched = replace(
            cfg.schedule,
            causal_block_size=cfg.schedule.causal_block_size or d.get("causal_block_size")
            or max(1, tcfg.num_frame_per_block),
            ar_step=cfg.schedule.ar_step if cfg.schedule.ar_step is not None else d.get("ar_step", 0),
            window_blocks=cfg.schedule.window_blocks or d.get("window_blocks"),  # None: derived below
            base_num_frames=cfg.schedule.base_num_frames or d.get("base_num_frames"),
        )
        kv = replace(
            cfg.kv,
            policy=cfg.kv.policy or d.get("kv_policy", "full"),
            budget_frames=cfg.kv.budget_frames or d.get("kv_window_latent_frames"),
            context_noise=cfg.kv.context_noise if cfg.kv.context_noise is not None else d.get("context_noise", 0.0),
            pool_width=cfg.kv.pool_width if cfg.kv.pool_width is not None
            else d.get("kv_pool_width", DEFAULT_POOL_WIDTH),
        )
        if kv.commit not in ("clean", "last-step"):
            raise ConfigError(f"kv.commit must be 'clean' or 'last-step', got {kv.commit!r}")
        if kv.section_sink not in ("move", "keep"):
            raise ConfigError(f"kv.section_sink must be 'move' or 'keep', got {kv.section_sink!r}")
        if kv.evict_unit not in EVICT_UNITS:
            raise ConfigError(f"kv.evict_unit must be one of {', '.join(EVICT_UNITS)}, got {kv.evict_unit!r}")
        if sched.window_blocks is None:
            # never hold a whole long video in flight: one window = base_num_frames (97, SkyReels' 540P window)
            base_latent = ((sched.base_num_frames or 97) - 1) // tf + 1
            sched = replace(sched, window_blocks=max(1, base_latent // sched.causal_block_size))
        cfg = replace(cfg, height=height, width=width, sampler=sampler, schedule=sched, kv=kv)
        latent_frames = (cfg.frames - 1 + tf - 1) // tf + 1
        guidance = cfg.guidance_scale if cfg.guidance_scale is not None else d.get("guidance_scale", 5.0)
        return Resolved(
            cfg, latent_frames, height // s, width // s, tcfg.in_channels, sampler.steps, guidance,
            cfg.fps or d.get("fps", 24), sched.causal_block_size, float(kv.context_noise),
        )

    def make_schedule(self, r: Resolved):
        sc = r.cfg.schedule
        if sc.name == "diffusion-forcing":
            return build_schedule(
                "diffusion-forcing", num_latent_frames=r.latent_frames, steps=r.steps,
                causal_block_size=r.block, ar_step=sc.ar_step, window_blocks=sc.window_blocks,
            )
        if sc.name == "pipelined":
            return build_schedule(
                "pipelined", num_latent_frames=r.latent_frames, steps=r.steps, chunk_frames=r.block,
                window_size=sc.window_size,
            )
        raise ConfigError(f"unknown schedule {sc.name!r}; choose diffusion-forcing, pipelined or window")

    # -- text ------------------------------------------------------------------------------------
    def section_plan(self, r: Resolved) -> SectionPlan:
        """The prompt of every chunk (arvideo/sections.py); validates the request's sections."""
        if r.cfg.sections and r.cfg.schedule.name == "window":
            raise ConfigError("prompt sections need the diffusion-forcing or pipelined schedule, not window mode")
        if r.cfg.schedule.name == "window":
            starts = [0]  # one prompt, no chunks to assign
        else:
            sched = self.make_schedule(r)
            starts = [sched.chunk_frames(i)[0] for i in range(sched.num_chunks)]
        return SectionPlan.from_config(r.cfg, self.model.temporal_factor, starts, r.fps)

    def encode_text(self, r: Resolved, prompt_embeds=None, negative_prompt_embeds=None,
                    sections: SectionPlan | None = None) -> list[torch.Tensor]:
        """Backbone-space text of every prompt of the request (one per section), each [B, L, D]
        with the conditional pass first and, under guidance, the unconditional one second."""
        dtype = DTYPES[r.cfg.dtype]
        device = self.backbone.device
        prompts = list(sections.prompts) if sections is not None else [r.cfg.prompt]
        if prompt_embeds is None:
            enc = require_prompt_encoder(self.model)
            embeds = enc(self._encoded_prompts(r, sections), device, dtype)
            prompt_embeds, negative_prompt_embeds = embeds[: len(prompts)], embeds[len(prompts):] if r.guidance > 1 else None
        elif len(prompts) > 1:
            raise ConfigError("prompt sections need the model's prompt encoder: pass prompts, not prompt_embeds")
        elif r.guidance > 1 and negative_prompt_embeds is None:
            raise ConfigError("guidance_scale > 1 needs negative_prompt_embeds when prompt_embeds are given")
        texts = []
        for i in range(len(prompts)):
            cond = prompt_embeds[i : i + 1]
            text = cond if r.guidance <= 1 else torch.cat([cond, negative_prompt_embeds])
            texts.append(self.backbone.prepare_text(text.to(device=device, dtype=dtype)))
        return texts

    @staticmethod
    def _encoded_prompts(r: Resolved, sections: SectionPlan | None) -> list[str]:
        """The prompts the text encoder sees: one per section, then the negative one under guidance."""
        prompts = list(sections.prompts) if sections is not None else [r.cfg.prompt]
        return prompts + ([r.cfg.negative_prompt] if r.guidance > 1 else [])

    def check_prompts(self, r: Resolved, sections: SectionPlan | None = None) -> None:
        """Raises PromptError for a prompt the model's grammar cannot parse, before any work starts."""
        if self.model.prompt_encoder is not None:
            self.model.prompt_encoder.check(self._encoded_prompts(r, sections))

    @staticmethod
    def _guide(v: torch.Tensor, r: Resolved) -> torch.Tensor:
        """Classifier-free guidance over the passes of one call: the conditional pass first, the
        unconditional one last."""
        return v[1:2] + r.guidance * (v[0:1] - v[1:2])

    # -- public API ------------------------------------------------------------------------------
    def generate(self, cfg: GenerateConfig, **kwargs) -> np.ndarray:
        """Collects every frame of `stream` (uint8 [frames, H, W, 3])."""
        parts = [c.frames for c in self.stream(cfg, **kwargs)]
        return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)

    def stream(
        self,
        cfg: GenerateConfig,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        decode: bool = True,
        progress: bool = False,
        resume: RunState | None = None,
        on_state: Callable[[Callable[[], RunState]], None] | None = None,
        teacher: Callable[[int], torch.Tensor] | None = None,
    ) -> Iterator[FrameChunk]:
        """Yields finished chunks in order, while generation continues.

        on_state(get) is called each time the caller asks for the next chunk (so the previous
        one has been written): `get()` snapshots the run; its `emitted_frames` are the frames
        handed out so far. resume: such a snapshot from an interrupted run of the same request;
        the continued stream starts at frame `resume.emitted_frames`.
        teacher(chunk index) -> clean latents: teacher-forced evaluation; finished chunks are
        committed to the KV store from these (a reference run's) latents instead of their own,
        so every chunk is denoised from the reference context and only its own error counts.
        """
        r = self.resolve(cfg)
        sections = self.section_plan(r)
        texts = self.encode_text(r, prompt_embeds, negative_prompt_embeds, sections)
        fingerprint = request_fingerprint(r, self.model.path)
        if resume is not None:
            if resume.fingerprint != fingerprint:
                raise ConfigError("the saved run state belongs to a different request or model; "
                                  "delete it or repeat the original settings exactly")
            if r.cfg.schedule.name == "window":
                raise ConfigError("resume supports the diffusion-forcing and pipelined schedules, not window mode")
        if decode:
            self.decoder.reset()
            if resume is not None:
                self.decoder.load_state(resume.decoder)
        self.model_calls = resume.model_calls if resume is not None else 0
        if r.cfg.schedule.name == "window":
            inner = self._stream_windows(r, texts[0], callback)
        else:
            inner = self._stream_chunks(r, texts, sections, callback, resume, teacher)
        emitted = resume.emitted_frames if resume is not None else 0
        bar = tqdm(total=r.cfg.frames, initial=emitted, unit="frame", disable=not progress, desc="frames")
        if resume is not None and resume.pending:
            inner = itertools.chain([list(resume.pending)], inner)
        worker = DecodeWorker(self.decoder, background=r.cfg.decode_ahead, keep_state=on_state is not None) if decode else None
        inner = iter(inner)
        try:
            while True:
                try:
                    finished = next(inner)
                except StopIteration:
                    break
                except Exception:
                    # frames of chunks that finished before the failure still reach the caller
                    while worker:
                        emitted = yield from self._emit(worker.pop(), worker, r, emitted, bar, None, fingerprint)
                    raise
                if worker is None:  # latents only: nothing to decode, no frames handed out
                    for n, (index, latents) in enumerate(finished):
                        yield FrameChunk(index, emitted, None, latents)
                        if on_state is not None and self._run is not None:
                            run, pending = self._run, finished[n + 1 :]
                            on_state(lambda run=run, pending=pending, emitted=emitted: run.snapshot(
                                fingerprint, emitted, self.model_calls, None, pending))
                    continue
                for index, latents in finished:
                    worker.submit(index, latents)
                # bounded: when decoding falls behind, generation waits instead of queueing latents
                while worker.ready() or len(worker) > DECODE_QUEUE:
                    emitted = yield from self._emit(worker.pop(), worker, r, emitted, bar, on_state, fingerprint)
            while worker:
                emitted = yield from self._emit(worker.pop(), worker, r, emitted, bar, on_state, fingerprint)
        finally:
            if worker is not None:
                worker.close()
            bar.close()
            self._run = None

    def _emit(self, done: Decoded, worker: DecodeWorker, r: Resolved, emitted: int, bar, on_state, fingerprint):
        """Hands out one decoded chunk; returns the frames handed out so far."""
        frames = done.frames[: max(0, r.cfg.frames - emitted)]
        bar.update(len(frames))
        yield FrameChunk(done.index, emitted, frames, done.latents)
        emitted += len(frames)
        # the caller asked for more, so it has written this chunk: a consistent point
        if on_state is not None and self._run is not None:
            run, pending, state = self._run, worker.pending(), done.decoder_state
            # bound now: the getter must describe this point even if called later
            on_state(lambda: run.snapshot(fingerprint, emitted, self.model_calls, state, pending))
        return emitted

    # -- KV-cached chunk streaming --------------------------------------------------------------
    def _new_chunk(self, r: Resolved, index: int, start: int, end: int, sampler: Sampler, policy_factory) -> Chunk:
        shape = (1, r.channels, end - start, r.latent_height, r.latent_width)
        noise = torch.randn(shape, generator=chunk_generator(r.cfg.seed, index), dtype=torch.float32)
        probe = self._run.probe
        ctx = PolicyContext(index, r.steps, sampler.sigmas, sampler.timesteps, probe.features, probe.modulation)
        return Chunk(index, start, end, noise.to(self.backbone.device), sampler.new_state(), policy_factory(ctx),
                     guidance=guidance_for(policy_factory))

    def chunk_noise(self, cfg: GenerateConfig) -> torch.Tensor:
        """The initial noise of a whole KV-mode request, [1, C, F, h, w] (for tests and comparisons)."""
        r = self.resolve(cfg)
        sched = self.make_schedule(r)
        parts = []
        for i in range(sched.num_chunks):
            s, e = sched.chunk_frames(i)
            parts.append(torch.randn((1, r.channels, e - s, r.latent_height, r.latent_width),
                                     generator=chunk_generator(r.cfg.seed, i), dtype=torch.float32))
        return torch.cat(parts, dim=2)

    def _context_latents(self, r: Resolved, chunk: Chunk, teacher=None) -> torch.Tensor:
        latents = chunk.latents if teacher is None else teacher(chunk.index).to(chunk.latents)
        a = r.context_noise
        if a <= 0:
            return latents
        eps = torch.randn(chunk.latents.shape, generator=chunk_generator(r.cfg.seed, chunk.index, 1))
        return latents * (1.0 - 0.001 * a) + eps.to(latents.device) * (0.001 * a)

    def _make_store(self, r: Resolved, sched, batch: int) -> KVStore:
        from .kvstore import DEFAULT_KV_POSITIONS, ScoredEviction, TemporalRope

        lay = self.backbone.kv_layout(r.latent_height, r.latent_width)
        kv = r.cfg.kv
        if kv.policy != "full" and not kv.budget_frames:
            raise ConfigError(f"KV policy {kv.policy!r} needs kv.budget_frames (latent frames of context)")
        budget = kv.budget_frames * lay.tokens_per_frame if kv.policy != "full" else None
        positions = kv.positions or self.model.defaults.get("kv_positions", DEFAULT_KV_POSITIONS)
        t_dim = getattr(getattr(self.model.transformer, "rope", None), "t_dim", None)
        return KVStore(
            lay.num_layers, batch, lay.heads, lay.head_dim, policy=kv.policy, budget_tokens=budget,
            scratch_tokens=(sched.max_in_flight + 1) * r.block * lay.tokens_per_frame,
            tokens_per_frame=lay.tokens_per_frame, positions=positions,
            rope=TemporalRope(t_dim) if t_dim else None,
            scoring=ScoredEviction(kv.score_lambda, kv.pool_width, kv.queries, kv.protect_sink, kv.protect_recent,
                                   kv.evict_unit),
            clean_commit=kv.commit == "clean", dtype=self.backbone.dtype, device=self.backbone.device,
        )

    def _positions(self, r: Resolved, store: KVStore, members: list[Chunk]) -> torch.Tensor:
        """Rotary frame positions of the computed members: absolute latent-frame indices."""
        return torch.cat([torch.arange(c.frame_start, c.frame_end) for c in members])

    @staticmethod
    def _steer_tokens(sections: SectionPlan, members, commits, computed, tokens_per_frame: int) -> int | None:
        """Prompt sections: the computed tokens whose queries may steer the store's eviction (the
        commits and the chunks in the section of the oldest in flight), so that chunks of a later
        prompt never change what the chunks before them see; None without sections."""
        if not sections.sectioned or len(members) == len(commits):
            return None
        section = sections.chunk_sections[members[len(commits)].index]
        steer = 0
        for j, c in enumerate(computed):
            if j >= len(commits) and sections.chunk_sections[c.index] != section:
                break
            steer += c.num_frames * tokens_per_frame
        return steer

    def _stream_chunks(self, r: Resolved, texts: list[torch.Tensor], sections: SectionPlan, callback,
                       resume: RunState | None, teacher=None):
        """Yields, once per tick, the (chunk index, clean latents) of chunks finished in it."""
        sched = self.make_schedule(r)
        sampler = Sampler(r.cfg.sampler.name, r.steps, r.cfg.sampler.shift, r.cfg.sampler.grid,
                          self.model.scheduler_config)
        policy_factory = make_policy_factory(r.cfg.cache.preset, r.steps, self.model.path)
        tokens_per_frame = self.backbone.kv_layout(r.latent_height, r.latent_width).tokens_per_frame
        batch = texts[0].shape[0]
        clean_commit = r.cfg.kv.commit == "clean"
        if teacher is not None and not clean_commit:
            raise ConfigError("teacher-forced evaluation needs kv.commit=clean")
        keep_kv = policy_factory.may_skip
        if resume is not None:
            run = resume.run
            run.store.to(self.backbone.device)
            for c in run.chunks.values():
                c.latents = c.latents.to(self.backbone.device)
                c.kv = [(k.to(c.latents.device), v.to(c.latents.device)) for k, v in c.kv] if c.kv else None
                # a state saved before guidance reuse existed holds none: plain CFG state for it
                c.guidance = (c.guidance or guidance_for(policy_factory)).to(c.latents.device)
            run.probe.backbone = self.backbone
        else:
            run = Run(chunks={}, store=self._make_store(r, sched, batch), next_tick=0,
                      probe=BackboneProbe(self.backbone))
        self._run = run
        chunks, store = run.chunks, run.store
        last_step = r.steps - 1
        t_dtype = sampler.timesteps.dtype
        # prompt sections (kv.section_sink=move): each section's first chunk becomes the store's sink
        new_sinks = sections.openers() if r.cfg.kv.section_sink == "move" else set()
        for tick_no, tick in enumerate(sched.ticks()):
            if tick_no < run.next_tick:
                continue
            for i, _ in tick.active:
                if i not in chunks:
                    s, e = sched.chunk_frames(i)
                    chunks[i] = self._new_chunk(r, i, s, e, sampler, policy_factory)
            commits = [chunks.pop(i) for i in tick.commit] if clean_commit else []
            active = [(chunks[i], k) for i, k in tick.active]
            compute = {
                c.index: (not clean_commit and k == last_step) or (keep_kv and c.kv is None)
                or c.policy.should_compute(k, c.latents)
                for c, k in active
            }
            last = max((n for n, (c, _) in enumerate(active) if compute[c.index]), default=-1)
            members = commits + [c for c, _ in active[: last + 1]]
            if members:
                # skipped chunks before the last computed one stay visible through their kept K/V
                context = {j: c.kv for j, c in enumerate(members) if j >= len(commits) and not compute[c.index]}
                computed = [c for j, c in enumerate(members) if j not in context]
                x = torch.cat([self._context_latents(r, c, teacher) for c in commits]
                              + [c.latents for c in computed[len(commits):]], dim=2)
                t = torch.cat(
                    [torch.full((c.num_frames,), r.context_noise, dtype=t_dtype) for c in commits]
                    + [torch.full((c.num_frames,), sampler.timesteps[c.step].item(), dtype=t_dtype)
                       for c in computed[len(commits):]]
                ).to(x.device)
                plan = CallPlan(
                    [c.num_frames for c in members],
                    self._positions(r, store, computed),
                    commit=len(commits), context=context, keep_kv=keep_kv,
                    steer_tokens=self._steer_tokens(sections, members, commits, computed, tokens_per_frame),
                )
                # DeepCache-style policies run some members through the first/last blocks only
                deep = {j: c.policy.deep_plan(c.step) for j, c in enumerate(members)
                        if keep_kv and j >= len(commits) and j not in context and hasattr(c.policy, "deep_plan")}
                # guidance reuse: the call runs the conditional pass alone when no computed chunk needs
                # the unconditional one (and nothing is committed: committed K/V need both passes)
                reuse_guidance = batch > 1 and any(c.guidance.active for c in computed)
                cond_only = (reuse_guidance and not commits and not deep and clean_commit
                             and not any(c.guidance.needs_uncond() for c in computed))
                b = 1 if cond_only else batch
                # one text for the call, or (prompt sections) one per computed member, in call order
                member_sections = [sections.chunk_sections[c.index] for c in computed]
                if len(set(member_sections)) == 1:
                    text = texts[member_sections[0]][:b]
                else:
                    sliced = {i: texts[i][:b] for i in set(member_sections)}  # one object per prompt: spans merge
                    text = [sliced[i] for i in member_sections]
                v = self.backbone(x.expand(b, -1, -1, -1, -1), t.expand(b, -1), text, plan, store, fps=r.fps,
                                  **({"deep": deep} if deep else {}))
                self.model_calls += 1
                if batch > 1 and not reuse_guidance:
                    v = self._guide(v, r)
                offset = 0
                for j, c in enumerate(computed):
                    part = v[:, :, offset : offset + c.num_frames]
                    if j < len(commits) or not reuse_guidance:  # a commit's velocity is not used
                        c.velocity = part
                    elif cond_only:
                        c.velocity = c.guidance.reuse(part, r.guidance)
                    else:
                        c.velocity = c.guidance.full(part[0:1], part[1:2], r.guidance)
                    offset += c.num_frames
                if keep_kv:
                    for j, kept in self.backbone.kept_kv.items():
                        if cond_only:  # conditional K/V are new; the unconditional pass keeps its last ones
                            kept = [(torch.cat([k, ok[1:]]), torch.cat([v_, ov[1:]]))
                                    for (k, v_), (ok, ov) in zip(kept, members[j].kv)]
                        members[j].kv = kept
                    for j, residual in (self.backbone.deep_residuals.items() if deep else ()):
                        members[j].policy.deep_observe(residual, members[j].kv)
                done = commits if clean_commit else [c for c in computed if c.step == last_step]
                if computed[: len(done)] != done:
                    raise AssertionError("finishing chunks must lead the call")  # pragma: no cover
                store.commit([(c.index, c.num_frames * tokens_per_frame) for c in done],
                             sink=next((c.index for c in done if c.index in new_sinks), None))
            events, finished = [], []
            for c, k in active:
                if c.step != k:
                    raise AssertionError(f"schedule asked chunk {c.index} for step {k}, it is at {c.step}")
                if compute[c.index]:
                    vel = c.velocity
                    c.policy.observe(k, c.latents, vel)
                else:
                    vel = c.policy.reuse(k, c.latents)
                if callback is not None:
                    events.append((c.index, k, sampler.predict_x0(c.latents, vel, k)))
                c.latents = sampler.step(c.sampler_state, c.latents, vel, k)
                c.velocity = None
                c.step = k + 1
                if not torch.isfinite(c.latents).all():
                    raise NonFiniteError(
                        f"NaN/inf in the latents of chunk {c.index} (latent frames {c.frame_start}-{c.frame_end - 1}) "
                        f"after step {k}; frames of earlier chunks were already written. Try float32, less "
                        f"guidance, or another seed"
                    )
                if c.step == r.steps:
                    c.kv = None
                    if not clean_commit:
                        chunks.pop(c.index)
                    finished.append((c.index, c.latents))
            run.next_tick = tick_no + 1
            if callback is not None:
                callback(StepEvent(tick_no, events, self.model_calls))
            yield finished

    # -- window mode (bidirectional checkpoints, diffusers' long-video algorithm) ---------------
    def _stream_windows(self, r: Resolved, text: torch.Tensor, callback):
        from .schedules.diffusion_forcing import timestep_index_matrix

        sc = r.cfg.schedule
        tf = self.model.temporal_factor
        block, n_lat = r.block, r.latent_frames
        sampler = Sampler(r.cfg.sampler.name, r.steps, r.cfg.sampler.shift, r.cfg.sampler.grid,
                          self.model.scheduler_config)
        long_video = sc.overlap_history is not None and sc.base_num_frames is not None and r.cfg.frames > sc.base_num_frames
        if sc.base_num_frames is not None and r.cfg.frames > sc.base_num_frames and sc.overlap_history is None:
            raise ConfigError("window mode: frames exceed schedule.base_num_frames; set schedule.overlap_history (17 or 37)")
        base = (sc.base_num_frames - 1) // tf + 1 if long_video else n_lat
        overlap = (sc.overlap_history - 1) // tf + 1 if long_video else 0
        if long_video and overlap >= base:
            raise ConfigError(f"overlap_history ({sc.overlap_history}) must be shorter than base_num_frames")
        n_iter = 1 + (n_lat - base - 1) // (base - overlap) + 1 if long_video else 1
        gen = torch.Generator(device="cpu").manual_seed(r.cfg.seed)
        template = torch.cat([torch.tensor([999]), sampler.timesteps.long(), torch.tensor([0])])
        batch = text.shape[0]
        history: torch.Tensor | None = None  # the last `overlap` latent frames, nothing more
        tick_no = 0
        for it in range(n_iter):
            prefix_frames = 0
            if it == 0:
                frames_w = base
            else:
                prefix = history[:, :, -overlap:]
                if prefix.shape[2] % block:
                    prefix = prefix[:, :, : prefix.shape[2] - prefix.shape[2] % block]
                prefix_frames = prefix.shape[2]
                finished = it * (base - overlap) + overlap
                frames_w = min(n_lat - finished + overlap, base)
            shape = (1, r.channels, frames_w, r.latent_height, r.latent_width)
            latents = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.backbone.device)
            if prefix_frames:
                latents[:, :, :prefix_frames] = prefix
            if frames_w % block:
                # diffusers would leave the tail frames of such a window as pure noise
                raise ConfigError(
                    f"window mode: window {it} has {frames_w} latent frames, not a multiple of "
                    f"causal_block_size={block}; choose frames/base_num_frames/overlap_history so windows divide evenly"
                )
            n_blocks = frames_w // block
            rows = timestep_index_matrix(n_blocks, r.steps, sc.ar_step, num_pre_ready=prefix_frames // block)
            states = [sampler.new_state() for _ in range(n_blocks)]
            prev = torch.zeros(n_blocks, dtype=torch.long)
            if prefix_frames:
                prev[: prefix_frames // block] = r.steps + 1
            sizes = [block] * n_blocks
            for row in rows:
                t_blocks = template[row]
                t = t_blocks.repeat_interleave(block)
                x_in = latents[:, :, : n_blocks * block].clone()
                if sc.addnoise_condition > 0 and prefix_frames:
                    a = 0.001 * sc.addnoise_condition
                    x_in[:, :, :prefix_frames] = x_in[:, :, :prefix_frames] * (1.0 - a) + torch.randn_like(
                        x_in[:, :, :prefix_frames]) * a
                    t = t.clone()
                    t[:prefix_frames] = int(sc.addnoise_condition)
                plan = CallPlan(sizes if block > 1 else [n_blocks], torch.arange(n_blocks * block),
                                bidirectional=block == 1)
                v = self.backbone(x_in.expand(batch, -1, -1, -1, -1), t.to(x_in.device).expand(batch, -1), text,
                                  plan, None, fps=r.fps)
                self.model_calls += 1
                if batch > 1:
                    v = self._guide(v, r)
                update = (row != prev) & (row != r.steps + 1)
                events = []
                for bi in torch.nonzero(update).flatten().tolist():
                    k = int(row[bi]) - 1
                    sl = slice(bi * block, (bi + 1) * block)
                    if callback is not None:
                        events.append((bi, k, sampler.predict_x0(latents[:, :, sl], v[:, :, sl], k)))
                    # a copy: UniPC keeps `sample` for its corrector, and latents is written in place
                    latents[:, :, sl] = sampler.step(states[bi], latents[:, :, sl].clone(), v[:, :, sl], k)
                if not torch.isfinite(latents).all():
                    raise NonFiniteError(f"NaN/inf in window {it} at row {tick_no}; frames of earlier windows were written")
                prev = row
                if callback is not None:
                    callback(StepEvent(tick_no, events, self.model_calls))
                tick_no += 1
            new = latents if it == 0 else latents[:, :, overlap:]
            history = latents if history is None else torch.cat([history, new], dim=2)[:, :, -max(overlap, 1):]
            yield [(it, new)]

