"""Wan-family transformer (diffusers `SkyReelsV2Transformer3DModel`, `WanTransformer3DModel`)
run chunk by chunk against an external KV store.

The weights and submodules are diffusers' own; this adapter re-drives their forward so that
packed chunks attend block-causally to the committed K/V in the store and to each other,
with one plain SDPA call per chunk and no L x L mask. Numerically it follows diffusers'
`SkyReelsV2TransformerBlock.forward` op for op, so a full-compute run equals diffusers'
block-causal forward (tests/test_exactness.py).
"""
from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from ..kvstore import KVStore
from .attention import attention
from .base import CallPlan, KVLayout


class WanFamilyBackbone:
    """Adapter around a diffusers Wan-family transformer; see module docstring."""

    def __init__(self, transformer: torch.nn.Module, attention_backend: str = "auto") -> None:
        self.model = transformer.eval()
        cfg = transformer.config
        self.patch = tuple(cfg.patch_size)
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.inject_fps = bool(getattr(cfg, "inject_sample_info", False))
        self.attention_backend = attention_backend
        rope = transformer.rope
        self._rope_split = (rope.t_dim, rope.h_dim, rope.w_dim)
        self._rope_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._axis_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- properties the engine reads -------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.patch_embedding.weight.device

    def kv_layout(self, latent_height: int, latent_width: int) -> KVLayout:
        tokens = (latent_height // self.patch[1]) * (latent_width // self.patch[2])
        return KVLayout(len(self.model.blocks), self.heads, self.head_dim, tokens)

    # -- text ----------------------------------------------------------------------------------
    def prepare_text(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Text projection of the condition embedder, done once per request."""
        return self.model.condition_embedder.text_embedder(prompt_embeds.to(self.dtype))

    # -- cheap probes for cache policies ------------------------------------------------------
    @torch.no_grad()
    def patch_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Patch embedding of latents [1, C, f, h, w] -> [1, tokens, D] (FlowCache's MAGI-1 indicator)."""
        return self.model.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).float()

    @torch.no_grad()
    def modulation(self, timestep: torch.Tensor) -> torch.Tensor:
        """Timestep modulation vector [6 * D] for one timestep value (TeaCache-style indicator)."""
        ce = self.model.condition_embedder
        t = timestep.reshape(1).to(self.device)
        t_emb = ce.timesteps_proj(t)
        t_emb = t_emb.to(next(ce.time_embedder.parameters()).dtype)
        return ce.time_proj(ce.act_fn(ce.time_embedder(t_emb))).flatten().float()

    # -- rotary tables ----------------------------------------------------------------------
    def _axis_freqs(self, axis: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self._rope_split[axis]
        cos, sin = get_1d_rotary_pos_embed(
            dim, positions.to(torch.float64), 10000.0, use_real=True, repeat_interleave_real=True,
            freqs_dtype=torch.float64,
        )
        return cos, sin

    def _rope(self, positions: torch.Tensor, pph: int, ppw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [1, L, 1, head_dim] for frames at absolute `positions` (diffusers' layout)."""
        key = (pph, ppw)
        if key not in self._axis_cache:
            hc, hs = self._axis_freqs(1, torch.arange(pph))
            wc, ws = self._axis_freqs(2, torch.arange(ppw))
            self._axis_cache[key] = (hc, hs, wc, ws)
        hc, hs, wc, ws = self._axis_cache[key]
        tc, ts = self._axis_freqs(0, positions.cpu())
        ppf = positions.numel()

        def grid(t, h, w):
            t = t.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            h = h.view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            w = w.view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            return torch.cat([t, h, w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1)

        return grid(tc, hc, wc).to(self.device), grid(ts, hs, ws).to(self.device)

    # -- forward ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor | list[torch.Tensor],
        plan: CallPlan,
        store: KVStore | None,
        fps: int | None = None,
        deep: dict | None = None,
    ) -> torch.Tensor:
        """text: [B, L, D] for every member, or a list with one per computed member (prompt sections).
        deep: member index -> plan with `first`, `last`, `residual`, `kv` (DeepCache partial compute,
        arvideo.caching.deepcache.DeepPlan); after the call `deep_residuals[j]` holds the middle-block
        residual of every member that ran the middle blocks."""
        m = self.model
        b, _, f, h, w = latents.shape
        p_t, p_h, p_w = self.patch
        if p_t != 1:
            raise NotImplementedError("temporal patching (patch_size[0] > 1) is not supported yet")
        pph, ppw = h // p_h, w // p_w
        hw = pph * ppw
        rope = self._rope(plan.positions, pph, ppw)

        x = m.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2)  # [B, L, D]

        ce = m.condition_embedder
        t_emb = ce.timesteps_proj(timesteps)  # [B, F, freq]
        te_dtype = next(ce.time_embedder.parameters()).dtype
        if t_emb.dtype != te_dtype:
            t_emb = t_emb.to(te_dtype)
        temb = ce.time_embedder(t_emb).to(self.dtype)  # [B, F, D] (the text's dtype)
        tproj = ce.time_proj(ce.act_fn(temb)).unflatten(-1, (6, -1))  # [B, F, 6, D]
        if self.inject_fps:
            fps_id = torch.full((b,), 0 if fps == 16 else 1, dtype=torch.long, device=x.device)
            tproj = tproj + m.fps_projection(m.fps_embedding(fps_id)).unflatten(1, (6, -1)).unsqueeze(1)
        tproj = tproj.transpose(1, 2).unsqueeze(3)  # [B, 6, F, 1, D]

        bounds = [0]  # token bounds of every member in the scratch layout
        for size in plan.sizes:
            bounds.append(bounds[-1] + size * hw)
        if plan.context and (store is None or plan.bidirectional):
            raise ValueError("context members need the KV store (block-causal calls)")
        if store is not None and not plan.bidirectional:
            store.reserve(bounds[-1])
        self.kept_kv = {j: [] for j in plan.computed} if plan.keep_kv else {}
        self.deep_residuals = {}

        member_text = None
        if not isinstance(text, torch.Tensor):
            if len(text) != len(plan.computed):
                raise ValueError(f"{len(text)} texts for {len(plan.computed)} computed members")
            member_text = dict(zip(plan.computed, text))
            text = _text_spans([(plan.sizes[j] * hw, member_text[j]) for j in plan.computed])

        n_layers = len(m.blocks)
        lo = hi = n_layers
        if deep:
            lo, hi = min(d.first for d in deep.values()), n_layers - min(d.last for d in deep.values())
            if lo >= hi:  # no middle range to skip
                lo = hi = n_layers
        for layer in range(lo):
            x = self._block(m.blocks[layer], layer, x, text, tproj, rope, bounds, plan, store, (b, f, hw))
        if lo < hi:
            # middle blocks: shallow members are left out (their K/V there come from their last full step)
            # and get their kept residual added at the end of the range
            shallow = {j for j, d in deep.items() if d.residual is not None}
            spans, tok, fr = {}, 0, 0
            for j in plan.computed:
                spans[j] = (tok, tok + plan.sizes[j] * hw, fr, fr + plan.sizes[j])
                tok, fr = tok + plan.sizes[j] * hw, fr + plan.sizes[j]
            run = [j for j in plan.computed if j not in shallow]
            x_in, x_mid = x, x
            if run:
                t_idx = torch.cat([torch.arange(spans[j][0], spans[j][1]) for j in run]).to(x.device)
                f_idx = torch.cat([torch.arange(spans[j][2], spans[j][3]) for j in run])
                steer = None if plan.steer_tokens is None else sum(
                    spans[j][1] - spans[j][0] for j in run if spans[j][1] <= plan.steer_tokens)
                sub_plan = CallPlan(plan.sizes, plan.positions[f_idx], commit=plan.commit,
                                    context={**plan.context, **{j: deep[j].kv for j in shallow}}, keep_kv=plan.keep_kv,
                                    steer_tokens=steer)
                sub_rope = (rope[0][:, t_idx], rope[1][:, t_idx])
                sub_tproj = tproj[:, :, f_idx.to(tproj.device)]
                x_mid = x[:, t_idx]
                sub_text = text if member_text is None else _text_spans(
                    [(plan.sizes[j] * hw, member_text[j]) for j in run])
            all_kept = self.kept_kv
            for layer in range(lo, hi):
                self.kept_kv = {j: kept for j, kept in all_kept.items() if j not in shallow}
                if run:
                    x_mid = self._block(m.blocks[layer], layer, x_mid, sub_text, sub_tproj, sub_rope, bounds, sub_plan,
                                        store, (b, len(f_idx), hw))
                self.kept_kv = all_kept
                for j in shallow:
                    if j in all_kept:
                        all_kept[j].append(deep[j].kv[layer])
            x = x_in.clone()
            if run:
                x[:, t_idx] = x_mid
            for j, d in deep.items():
                s, e = spans[j][0], spans[j][1]
                if j in shallow:
                    x[:, s:e] = x_in[:, s:e] + d.residual.to(x.dtype)
                else:
                    self.deep_residuals[j] = x[:, s:e] - x_in[:, s:e]
        for layer in range(hi, n_layers):
            x = self._block(m.blocks[layer], layer, x, text, tproj, rope, bounds, plan, store, (b, f, hw))

        shift, scale = (m.scale_shift_table.unsqueeze(2) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift = shift.squeeze(1).unsqueeze(2)  # [B, F, 1, D]
        scale = scale.squeeze(1).unsqueeze(2)
        xf = m.norm_out(x.float()).view(b, f, hw, -1)
        x = (xf * (1 + scale) + shift).flatten(1, 2).type_as(x)
        x = m.proj_out(x)
        x = x.reshape(b, f, pph, ppw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out.float()

    def _block(self, block, layer, x, text, tproj, rope, bounds, plan, store, dims):
        b, f, hw = dims
        e = (block.scale_shift_table.view(1, 6, 1, 1, -1) + tproj.float()).unbind(1)  # 6 x [B, F, 1, D]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = e

        def modulate(norm, h, scale, shift):
            return (norm(h.float()).view(b, f, hw, -1) * (1 + scale) + shift).flatten(1, 2)

        norm_x = modulate(block.norm1, x, scale_msa, shift_msa).type_as(x)
        attn_out = self._self_attention(block.attn1, layer, norm_x, rope, bounds, plan, store)
        x = (x.float().view(b, f, hw, -1) + attn_out.view(b, f, hw, -1) * gate_msa).flatten(1, 2).type_as(x)

        norm_x = block.norm2(x.float()).type_as(x)
        if isinstance(text, torch.Tensor):
            x = x + block.attn2(norm_x, text, None, None)
        else:  # prompt sections: each span of tokens reads its own text
            x = x + torch.cat([block.attn2(norm_x[:, s:e], t, None, None) for s, e, t in text], dim=1)

        norm_x = modulate(block.norm3, x, c_scale, c_shift).type_as(x)
        ff = block.ffn(norm_x)
        x = (x.float().view(b, f, hw, -1) + ff.float().view(b, f, hw, -1) * c_gate).flatten(1, 2).type_as(x)
        return x

    def _self_attention(self, attn, layer, x, rope, bounds, plan, store):
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q = attn.norm_q(q)
        k = attn.norm_k(k)
        q = _apply_rope(q.unflatten(2, (attn.heads, -1)), *rope).transpose(1, 2)  # [B, H, L, d]
        k = _apply_rope(k.unflatten(2, (attn.heads, -1)), *rope).transpose(1, 2)
        v = v.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        if plan.bidirectional or store is None:
            outs = [
                attention(q[:, :, s:e], k[:, :, s:e] if plan.bidirectional else k[:, :, :e],
                          v[:, :, s:e] if plan.bidirectional else v[:, :, :e], self.attention_backend)
                for s, e in zip(bounds[:-1], bounds[1:])
            ]
        elif not plan.context:
            store.write(layer, k, v)
            store.observe_queries(layer, q, bounds[plan.commit], plan.steer_tokens)
            outs = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                ks, vs = store.view(layer, e, q.shape[0])
                outs.append(attention(q[:, :, s:e], ks, vs, self.attention_backend))
        else:
            hidden = 0  # token offset of the next computed member within q/k/v
            spans = []
            for j, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                if j in plan.context:
                    ck, cv = plan.context[j][layer]
                    store.write(layer, ck[: q.shape[0]], cv[: q.shape[0]], offset=s)
                else:
                    store.write(layer, k[:, :, hidden : hidden + e - s], v[:, :, hidden : hidden + e - s], offset=s)
                    spans.append((hidden, hidden + e - s, e))
                    hidden += e - s
            store.observe_queries(layer, q, bounds[plan.commit], plan.steer_tokens)
            outs = []
            for hs, he, e in spans:
                ks, vs = store.view(layer, e, q.shape[0])
                outs.append(attention(q[:, :, hs:he], ks, vs, self.attention_backend))
        if self.kept_kv:
            hidden = 0
            for j in self.kept_kv:
                n = bounds[j + 1] - bounds[j]
                self.kept_kv[j].append((k[:, :, hidden : hidden + n].clone(), v[:, :, hidden : hidden + n].clone()))
                hidden += n
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _text_spans(members: list[tuple[int, torch.Tensor]]) -> list[tuple[int, int, torch.Tensor]]:
    """[(tokens, text), ...] in token order -> [(start, end, text), ...], neighbours with the same text merged."""
    spans: list[tuple[int, int, torch.Tensor]] = []
    pos = 0
    for n, t in members:
        if spans and spans[-1][2] is t:
            spans[-1] = (spans[-1][0], pos + n, t)
        else:
            spans.append((pos, pos + n, t))
        pos += n
    return spans


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding, x [B, L, H, d], cos/sin [1, L, 1, d]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def count_flops_per_token(transformer: torch.nn.Module, context_tokens: int) -> float:
    """Approximate forward FLOPs per query token: linear layers plus attention over `context_tokens`."""
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    per_layer = 2 * (4 * d * d + 2 * d * d + 2 * d * cfg.ffn_dim) + 4 * d * context_tokens
    return float(per_layer * cfg.num_layers + 2 * d * math.prod(cfg.patch_size) * cfg.out_channels)
