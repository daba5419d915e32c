"""KV memory: the keys and values of committed chunks, per layer, within a token budget.

Layout per layer: one buffer [B, H, capacity, d] holding the committed tokens in
[0, committed) followed by a scratch region that the current backbone call writes its own
tokens into. Chunk j of a call then attends to the contiguous slice
[0, committed + end_j): no copies, no masks. Committing a call's leading chunks is just
advancing `committed`; eviction compacts the buffer in place.

Bounded policies preallocate budget + scratch once and never grow. The budget is in tokens
per layer and per KV head: every head keeps exactly `budget` tokens (so one SDPA call still
covers all heads), but under `scored` eviction each head (and layer) keeps its own tokens.
Both CFG passes (batch 0 conditional, 1 unconditional) keep the same tokens, chosen on the
conditional pass: guidance extrapolates along cond - uncond, which must differ by the text
alone, not by which context each pass still sees.

Keys are stored after the rotary embedding. `positions="reindexed"` re-rotates cached keys
(temporal rotary sub-space only; rotations compose) so that, per head, the kept frames sit at
consecutive positions right before the next frame (StreamingLLM's positions by rank in the
cache): a kept first-chunk sink is then as near as the window, not thousands of frames away.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import eviction
from .errors import ConfigError

EVICTION_POLICIES = ("full", "window", "sink-window", "scored")
POSITION_MODES = ("absolute", "reindexed")
QUERY_MODES = ("chunk", "last-frame", "commit", "commit-last-frame")
EVICT_UNITS = ("token", "frame")
DEFAULT_KV_POSITIONS = "reindexed"  # kv.positions when neither the request nor the model folder sets it
DEFAULT_POOL_WIDTH = 7  # kv.pool_width when neither the request nor the model folder sets it (methods.md)


@dataclass
class Segment:
    """A committed chunk: its tokens per head and its latent frames [frame, frame + frames)."""

    chunk: int
    length: int
    frame: int = 0
    frames: int = 1


@dataclass(frozen=True)
class ScoredEviction:
    """Options of the `scored` policy (methods.md section 3)."""

    lam: float = 0.07  # weight of importance against redundancy
    pool_width: int = DEFAULT_POOL_WIDTH  # max-pool of importance along token order
    # chunk: every query of the chunks being denoised; last-frame: their last latent frame;
    # commit / commit-last-frame: the same for the chunks being committed (their clean re-run)
    queries: str = "chunk"
    protect_sink: bool = True  # always keep the first chunk
    protect_recent: bool = True  # always keep the most recently committed chunk
    # token: the best tokens per head (methods.md); frame: whole latent frames per head, ranked by
    # the mean score of their tokens (a context of whole frames, as the model was trained on)
    unit: str = "token"


@dataclass(frozen=True)
class TemporalRope:
    """Wan's temporal rotary sub-space: the first `dim` channels of a head, in interleaved pairs."""

    dim: int
    theta: float = 10000.0

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Keys [B, H, n, d] rotated by `delta` [H, n] frames (a key at position p moves to p + delta)."""
        half = self.dim // 2
        freqs = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64)[:half] / self.dim))
        angle = delta.to(torch.float64).unsqueeze(-1) * freqs  # [H, n, dim/2]
        cos = angle.cos().float().to(keys.device)
        sin = angle.sin().float().to(keys.device)
        t = keys[..., : self.dim].float()
        x1, x2 = t[..., 0::2], t[..., 1::2]
        out = keys.clone()
        out[..., 0 : self.dim : 2] = (x1 * cos - x2 * sin).to(keys.dtype)
        out[..., 1 : self.dim : 2] = (x1 * sin + x2 * cos).to(keys.dtype)
        return out


class KVStore:
    """Committed keys/values of finished chunks, bounded by `budget_tokens` unless policy is 'full'."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        *,
        policy: str = "full",
        budget_tokens: int | None = None,
        scratch_tokens: int = 0,
        tokens_per_frame: int = 1,
        positions: str = "absolute",
        rope: TemporalRope | None = None,
        scoring: ScoredEviction | None = None,
        clean_commit: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if policy not in EVICTION_POLICIES:
            raise ConfigError(f"unknown KV policy {policy!r}; choose one of {', '.join(EVICTION_POLICIES)}")
        if policy != "full" and (budget_tokens is None or budget_tokens <= 0):
            raise ConfigError(f"KV policy {policy!r} needs a positive budget (kv.budget_frames)")
        if positions not in POSITION_MODES:
            raise ConfigError(f"unknown KV positions {positions!r}; choose one of {', '.join(POSITION_MODES)}")
        if positions == "reindexed" and rope is None:
            raise ConfigError("kv.positions=reindexed needs the backbone's temporal rotary layout (rope)")
        scoring = scoring or ScoredEviction()
        if scoring.queries not in QUERY_MODES:
            raise ConfigError(f"unknown kv.queries {scoring.queries!r}; choose one of {', '.join(QUERY_MODES)}")
        if scoring.pool_width < 1 or scoring.pool_width % 2 == 0:
            raise ConfigError(f"kv.pool_width must be an odd number >= 1, got {scoring.pool_width}")
        if scoring.unit not in EVICT_UNITS:
            raise ConfigError(f"unknown kv.evict_unit {scoring.unit!r}; choose one of {', '.join(EVICT_UNITS)}")
        if not 0.0 <= scoring.lam <= 1.0:
            raise ConfigError(f"kv.score_lambda must lie in [0, 1], got {scoring.lam}")
        self.policy = policy
        self.budget = budget_tokens if policy != "full" else None
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.tokens_per_frame = tokens_per_frame
        self.positions, self.rope, self.scoring = positions, rope, scoring
        self.clean_commit = clean_commit
        self.segments: list[Segment] = []
        self.committed = 0
        self.scratch = 0
        self.next_frame = 0  # latent frame index of the next committed token
        self.sink_start = 0  # frames [sink_start, sink_end) belong to the sink chunk: the first one,
        self.sink_end = 0  # or the first of the current prompt section (commit(..., sink=))
        # bounded policies: per layer, per head, per committed slot (CPU int64 [H, committed]);
        # always reassigned, never written in place, so a shallow copy (a run snapshot) stays valid
        self.frame_of: list[torch.Tensor] = [torch.zeros(heads, 0, dtype=torch.long)] * num_layers
        self.rotated_to: list[torch.Tensor] = list(self.frame_of)
        self.importance: list[torch.Tensor | None] = [None] * num_layers
        initial = (self.budget or 0) + scratch_tokens
        self._alloc(max(initial, 1), dtype, torch.device(device))

    def _alloc(self, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.batch, self.heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, tokens: int) -> None:
        """Makes room for a call of `tokens` scratch tokens after the committed ones."""
        need = self.committed + tokens
        if need > self.capacity:
            if self.budget is not None and self.capacity >= self.budget + tokens:
                raise AssertionError("bounded store cannot overflow")  # pragma: no cover
            grow = max(need, 2 * self.capacity) if self.budget is None else need
            for layer in range(self.num_layers):
                for buf in (self.keys, self.values):
                    old = buf[layer]
                    new = old.new_zeros((*old.shape[:2], grow, old.shape[3]))
                    new[:, :, : self.committed] = old[:, :, : self.committed]
                    buf[layer] = new
        self.scratch = tokens

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> None:
        """Writes keys/values [B, H, n, d] into the scratch region of `layer`, `offset` tokens in.

        B may be smaller than the store's batch (a conditional-only call under guidance reuse):
        the first B passes are written, the others' scratch is left as it was.
        """
        start = self.committed + offset
        end = start + k.shape[2]
        self.keys[layer][: k.shape[0], :, start:end] = k
        self.values[layer][: v.shape[0], :, start:end] = v

    def observe_queries(self, layer: int, queries: torch.Tensor, commit_tokens: int = 0,
                        query_end: int | None = None) -> None:
        """Sees the queries [B, H, n, d] of the call's computed chunks, after its keys are written.

        commit_tokens: the leading tokens that belong to chunks this call commits (kv.commit=clean);
        the rest are the chunks being denoised, of which only those before `query_end` steer
        eviction (prompt sections: not a later section's). When the commit may overflow the budget, scored
        eviction records now how much the conditional pass's queries (`kv.queries`) attend to
        each key that could then be kept: softmax over those keys, averaged over the queries.
        """
        if self.policy != "scored":
            return
        end = self.committed + (commit_tokens if self.clean_commit else self.scratch)
        if end <= self.budget or (self.clean_commit and commit_tokens == 0):
            self.importance = self.importance[:layer] + [None] + self.importance[layer + 1 :]
            return
        mode = self.scoring.queries
        q = queries[0, :, :commit_tokens] if mode.startswith("commit") else queries[0, :, commit_tokens:query_end]
        if mode.endswith("last-frame"):
            q = q[:, -self.tokens_per_frame :]
        imp = eviction.attention_importance(q, self.keys[layer][0, :, :end])
        self.importance = self.importance[:layer] + [imp] + self.importance[layer + 1 :]

    def view(self, layer: int, upto: int, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of all committed tokens plus the first `upto` scratch tokens of this call (first `batch` passes)."""
        end = self.committed + upto
        return self.keys[layer][:batch, :, :end], self.values[layer][:batch, :, :end]

    def commit(self, chunks: list[tuple[int, int]], sink: int | None = None) -> None:
        """Keeps the call's leading scratch tokens: `chunks` = [(chunk index, tokens), ...].

        sink: index of a chunk among them that becomes the protected sink in place of the
        current one (the first chunk of a new prompt section); the old sink is then evictable."""
        new_frames = []
        for chunk, length in chunks:
            frames = max(1, -(-length // self.tokens_per_frame))
            if (not self.segments and self.next_frame == 0) or chunk == sink:
                self.sink_start, self.sink_end = self.next_frame, self.next_frame + frames
            self.segments.append(Segment(chunk, length, self.next_frame, frames))
            new_frames.append(self.next_frame + torch.arange(length) // self.tokens_per_frame)
            self.next_frame += frames
            self.committed += length
        if new_frames and self.budget is not None:  # `full` never evicts nor re-positions: no bookkeeping
            added = torch.cat(new_frames).expand(self.heads, -1)
            self.frame_of = [torch.cat([f, added], dim=1) for f in self.frame_of]
            self.rotated_to = [torch.cat([p, added], dim=1) for p in self.rotated_to]
        self.scratch = 0
        if self.budget is not None and self.committed > self.budget:
            self._evict()
        self.importance = [None] * self.num_layers
        if self.positions == "reindexed" and self.budget is not None:
            self._reindex()

    # -- eviction ------------------------------------------------------------------------------
    def _evict(self) -> None:
        if self.policy == "scored":
            self._gather([self._scored_keep(layer) for layer in range(self.num_layers)])
            held = torch.cat([f.flatten() for f in self.frame_of]).unique()
            self.segments = [s for s in self.segments
                             if bool(((held >= s.frame) & (held < s.frame + s.frames)).any())]
            return
        sink = getattr(self, "sink_start", 0)  # (a run state saved before sections has no sink_start)
        drop: list[int] = []
        total = self.committed
        for i, seg in enumerate(self.segments):  # oldest first, the sink segment kept under sink-window
            if total <= self.budget:
                break
            if self.policy == "sink-window" and seg.frame == sink:
                continue
            drop.append(i)
            total -= seg.length
        if total > self.budget:
            raise ConfigError(
                f"KV budget of {self.budget} tokens is smaller than one chunk "
                f"({self.segments[-1].length} tokens); raise kv.budget_frames"
            )
        if drop:
            dropped = set(drop)
            keep = [j for j in range(len(self.segments)) if j not in dropped]
            starts, pos = [], 0
            for seg in self.segments:
                starts.append(pos)
                pos += seg.length
            index = torch.cat([torch.arange(starts[j], starts[j] + self.segments[j].length) for j in keep])
            self.segments = [self.segments[j] for j in keep]
            self._gather([index.expand(self.heads, -1)] * self.num_layers)

    def _scored_keep(self, layer: int) -> torch.Tensor:
        """Slots [H, budget] that layer `layer` keeps, by importance-redundancy score."""
        n = self.committed
        keys = self.keys[layer][0, :, :n]  # conditional pass decides for both
        imp = self.importance[layer]
        imp = imp[:, :n] if imp is not None else keys.new_zeros((self.heads, n), dtype=torch.float32)
        score = eviction.scores(imp, keys, self.scoring.lam, self.scoring.pool_width).cpu()
        frames = self.frame_of[layer]
        protected = torch.zeros_like(frames, dtype=torch.bool)
        if self.scoring.protect_sink:
            protected |= (frames >= getattr(self, "sink_start", 0)) & (frames < self.sink_end)
        if self.scoring.protect_recent and self.segments:
            protected |= frames >= self.segments[-1].frame
        most = int(protected.sum(dim=1).max())
        if most > self.budget:
            raise ConfigError(
                f"KV budget of {self.budget} tokens cannot hold the protected sink and most recent chunk "
                f"({most} tokens); raise kv.budget_frames or set kv.protect_sink=false / kv.protect_recent=false"
            )
        if self.scoring.unit == "frame":
            return eviction.select_frames(score, frames, self.budget // self.tokens_per_frame, protected)
        return eviction.select(score, self.budget, protected)

    def _gather(self, keep: list[torch.Tensor]) -> None:
        """Compacts every layer to the slots keep[layer] ([H, n], ascending) in place."""
        n = keep[0].shape[1]
        for layer, index in enumerate(keep):
            idx = index.to(self.keys[layer].device)[None, :, :, None].expand(self.batch, -1, -1, self.head_dim)
            for buf in (self.keys, self.values):
                buf[layer][:, :, :n] = torch.gather(buf[layer][:, :, : self.committed], 2, idx)
        self.frame_of = [torch.gather(f, 1, i) for f, i in zip(self.frame_of, keep)]
        self.rotated_to = [torch.gather(p, 1, i) for p, i in zip(self.rotated_to, keep)]
        self.committed = n

    # -- positions -----------------------------------------------------------------------------
    def rank_positions(self, layer: int) -> torch.Tensor:
        """Per head, next_frame - 1 - (distinct kept frames newer than the slot's frame): [H, committed]."""
        frames = self.frame_of[layer]
        if frames.shape[1] == 0:
            return frames
        new = torch.ones_like(frames, dtype=torch.long)
        new[:, 1:] = (frames[:, 1:] != frames[:, :-1]).long()
        distinct = new.cumsum(dim=1) - 1  # 0 for the oldest kept frame
        newer = distinct[:, -1:] - distinct
        return self.next_frame - 1 - newer

    def _reindex(self) -> None:
        targets = []
        for layer in range(self.num_layers):
            target = self.rank_positions(layer)
            delta = target - self.rotated_to[layer]
            if bool(delta.any()):
                n = self.committed
                self.keys[layer][:, :, :n] = self.rope.rotate(self.keys[layer][:, :, :n], delta)
            targets.append(target)
        self.rotated_to = targets

    # -- misc ------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> KVStore:
        self.keys = [k.to(device) for k in self.keys]
        self.values = [v.to(device) for v in self.values]
        return self

    def chunks(self) -> list[int]:
        """Indices of the chunks with tokens held (by any layer or head), oldest first."""
        return [s.chunk for s in self.segments]
