"""The small interface a backbone implements for the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..kvstore import KVStore


@dataclass(frozen=True)
class KVLayout:
    """Shape of the keys/values a backbone writes per layer: [batch, heads, tokens, head_dim]."""

    num_layers: int
    heads: int
    head_dim: int
    tokens_per_frame: int


@dataclass
class CallPlan:
    """One backbone call: several chunks packed along the frame axis.

    sizes: latent frames of each packed chunk ("member"), in causal order. Member j attends
        to the committed K/V in the store plus members 0..j of this call (block-causal, no mask).
    positions: absolute latent-frame index of every frame of the COMPUTED members.
    commit: how many leading members are commits: their K/V stay in the store after the call.
    bidirectional: one chunk attending to itself only (window mode); no store access.
    context: members that are not computed this call (their cache policy skipped the step)
        but whose keys/values later members still attend to: member index -> per-layer
        (k, v) [B, H, tokens, d] kept from that chunk's last computed step.
    keep_kv: after the call, `backbone.kept_kv[j]` holds the per-layer (k, v) of every
        computed member j, for use as `context` on later ticks.
    steer_tokens: only the queries of the first `steer_tokens` computed tokens (commits
        included) may steer the store's eviction; None: all (prompt sections keep a later
        section's chunks from steering what the chunks before it see).
    """

    sizes: list[int]
    positions: torch.Tensor
    commit: int = 0
    bidirectional: bool = False
    context: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    keep_kv: bool = False
    steer_tokens: int | None = None

    @property
    def computed(self) -> list[int]:
        return [j for j in range(len(self.sizes)) if j not in self.context]


class Backbone(Protocol):
    """Predicts flow velocities for packed chunks, reading and writing an external KV store."""

    kv_layout: KVLayout
    dtype: torch.dtype
    device: torch.device

    def prepare_text(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Projects text-encoder states once per request ([B, L, D_text] -> backbone space)."""

    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        plan: CallPlan,
        store: KVStore | None,
    ) -> torch.Tensor:
        """latents [B, C, F, H, W], timesteps [B, F] -> velocity [B, C, F, H, W] (float32)."""
