"""Importance-redundancy token scores for a bounded KV store (R-KV style, methods.md section 3).

Every function works on one layer and one batch entry: keys [H, L, d], queries [Hq, n, d].
A higher score means "keep". Scores are per KV head, so heads may keep different tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QUERY_BLOCK = 256  # queries per softmax block: bounds the [Hq, block, L] temporary


def attention_importance(queries: torch.Tensor, keys: torch.Tensor, block: int = QUERY_BLOCK) -> torch.Tensor:
    """Mean over queries of softmax(q k^T / sqrt d) over `keys`: [Hq, n, d] x [H, L, d] -> [H, L].

    Grouped heads (Hq = g * H, query head i reads KV head i // g) take the max over each group.
    An empty query set gives zeros.
    """
    hq, n, d = queries.shape
    h, length, _ = keys.shape
    if hq % h:
        raise ValueError(f"{hq} query heads do not group evenly over {h} KV heads")
    if n == 0 or length == 0:
        return keys.new_zeros((h, length), dtype=torch.float32)
    k = keys.float().repeat_interleave(hq // h, dim=0)  # [Hq, L, d]
    total = torch.zeros(hq, length, dtype=torch.float32, device=keys.device)
    scale = 1.0 / math.sqrt(d)
    for s in range(0, n, block):
        logits = torch.matmul(queries[:, s : s + block].float(), k.transpose(1, 2)) * scale
        total += torch.softmax(logits, dim=-1).sum(dim=1)
    return (total / n).view(h, hq // h, length).amax(dim=1)


def smooth(importance: torch.Tensor, width: int) -> torch.Tensor:
    """1-D max-pool of width `width` (odd) along token order, same length: [H, L] -> [H, L]."""
    if width <= 1:
        return importance
    if width % 2 == 0:
        raise ValueError(f"pooling width must be odd, got {width}")
    return F.max_pool1d(importance.unsqueeze(0), width, stride=1, padding=width // 2).squeeze(0)


def redundancy(keys: torch.Tensor) -> torch.Tensor:
    """softmax over tokens of the mean cosine similarity of each key to all keys, in O(L d): [H, L, d] -> [H, L].

    With k' = k / |k| and S = sum_j k'_j, s_i = (k'_i . S - 1) / L.
    """
    k = F.normalize(keys.float(), dim=-1)
    total = k.sum(dim=1, keepdim=True)  # [H, 1, d]
    s = ((k * total).sum(dim=-1) - 1.0) / keys.shape[1]
    return torch.softmax(s, dim=-1)


def scores(importance: torch.Tensor, keys: torch.Tensor, lam: float = 0.07, width: int = 7) -> torch.Tensor:
    """lam * maxpool(importance) - (1 - lam) * redundancy: [H, L]."""
    return lam * smooth(importance, width) - (1.0 - lam) * redundancy(keys)


def select(score: torch.Tensor, keep: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `keep` best tokens per head, in token order: [H, L] -> [H, keep] (int64).

    Protected tokens ([H, L] bool) are always kept; ties go to the older token.
    """
    if protected is not None:
        score = score.masked_fill(protected, float("inf"))
    # a stable descending sort keeps the older token on ties (topk's order is unspecified)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :keep]
    return order.sort(dim=-1).values


def select_frames(score: torch.Tensor, frames: torch.Tensor, keep: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the tokens of the `keep` best whole frames per head, in token order: [H, L] -> [H, n].

    frames [H, L]: each slot's frame (ascending along L, every frame whole). A frame's score is the
    mean of its tokens'; a frame with a protected token is kept; ties go to the older frame. Every
    head keeps the same number of frames, so n = keep x tokens per frame when frames are equal in size.
    """
    h = score.shape[0]
    ids, local = torch.unique(frames, return_inverse=True)  # local [H, L]: frame rank among all held
    nf = ids.numel()
    total = torch.zeros(h, nf, dtype=torch.float32).scatter_add_(1, local, score.float())
    count = torch.zeros(h, nf, dtype=torch.float32).scatter_add_(1, local, torch.ones_like(score, dtype=torch.float32))
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("-inf")))
    if protected is not None:
        hit = torch.zeros(h, nf, dtype=torch.float32).scatter_add_(1, local, protected.float()) > 0
        mean = mean.masked_fill(hit, float("inf"))
    best = torch.sort(mean, dim=-1, descending=True, stable=True).indices[:, :keep]  # [H, keep]
    chosen = torch.zeros(h, nf, dtype=torch.bool).scatter_(1, best, True)
    keep_token = torch.gather(chosen, 1, local)  # [H, L]
    sizes = keep_token.sum(dim=1)
    if bool((sizes != sizes[0]).any()):
        raise ValueError("frames of unequal size: every head must keep the same number of tokens")
    return torch.nonzero(keep_token)[:, 1].view(h, -1)
