"""The small interface a backbone implements for the engine."""
from __future__ import annotations

from dataclasses import dataclass
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

    sizes: latent frames of each packed chunk, in causal order. Chunk j attends to the
        committed K/V in the store plus chunks 0..j of this call (block-causal, no mask).
    positions: absolute latent-frame index of every packed frame (for rotary embeddings).
    commit: how many leading chunks are commits: their K/V stay in the store after the call.
    bidirectional: one chunk attending to itself only (window mode); no store access.
    """

    sizes: list[int]
    positions: torch.Tensor
    commit: int = 0
    bidirectional: bool = False


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
