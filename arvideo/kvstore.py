"""KV memory: the keys and values of committed chunks, per layer, within a token budget.

Layout per layer: one buffer [B, H, capacity, d] holding the committed tokens in
[0, committed) followed by a scratch region that the current backbone call writes its own
tokens into. Chunk j of a call then attends to the contiguous slice
[0, committed + end_j): no copies, no masks. Committing a call's leading chunks is just
advancing `committed`; eviction compacts the buffer in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

EVICTION_POLICIES = ("full", "window", "sink-window")


@dataclass
class Segment:
    """A committed chunk's tokens in the store."""

    chunk: int
    length: int


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
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if policy not in EVICTION_POLICIES:
            raise ConfigError(f"unknown KV policy {policy!r}; choose one of {', '.join(EVICTION_POLICIES)}")
        if policy != "full" and (budget_tokens is None or budget_tokens <= 0):
            raise ConfigError(f"KV policy {policy!r} needs a positive budget (kv.budget_tokens)")
        self.policy = policy
        self.budget = budget_tokens if policy != "full" else None
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.segments: list[Segment] = []
        self.committed = 0
        self.scratch = 0
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
        """Writes keys/values [B, H, n, d] into the scratch region of `layer`, `offset` tokens in."""
        start = self.committed + offset
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v

    def observe_queries(self, layer: int, queries: torch.Tensor) -> None:
        """Sees the queries [B, H, n, d] of the chunks being denoised (for importance-scored eviction)."""
        return None

    def view(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of all committed tokens plus the first `upto` scratch tokens of this call."""
        end = self.committed + upto
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self, chunks: list[tuple[int, int]]) -> None:
        """Keeps the call's leading scratch tokens: `chunks` = [(chunk index, tokens), ...]."""
        for chunk, length in chunks:
            self.segments.append(Segment(chunk, length))
            self.committed += length
        self.scratch = 0
        if self.budget is not None:
            self._evict()

    def _evict(self) -> None:
        protected = 1 if self.policy == "sink-window" else 0
        drop: list[int] = []
        total = self.committed
        i = protected
        while total > self.budget and i < len(self.segments):
            drop.append(i)
            total -= self.segments[i].length
            i += 1
        if total > self.budget:
            raise ConfigError(
                f"KV budget of {self.budget} tokens is smaller than one chunk "
                f"({self.segments[-1].length} tokens); raise kv.budget_tokens"
            )
        if drop:
            self._keep([j for j in range(len(self.segments)) if j not in set(drop)])

    def _keep(self, keep: list[int]) -> None:
        starts, pos = [], 0
        for seg in self.segments:
            starts.append(pos)
            pos += seg.length
        index = torch.cat(
            [torch.arange(starts[j], starts[j] + self.segments[j].length) for j in keep]
        ).to(self.keys[0].device)
        n = index.numel()
        for layer in range(self.num_layers):
            for buf in (self.keys, self.values):
                buf[layer][:, :, :n] = buf[layer].index_select(2, index)
        self.segments = [self.segments[j] for j in keep]
        self.committed = n

    def to(self, device: torch.device | str) -> "KVStore":
        self.keys = [k.to(device) for k in self.keys]
        self.values = [v.to(device) for v in self.values]
        return self

    def chunks(self) -> list[int]:
        """Indices of the chunks whose tokens are held, oldest first."""
        return [s.chunk for s in self.segments]
