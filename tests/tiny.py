"""Tiny random diffusers models for CPU tests (float32)."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel


def tiny_transformer(in_channels: int = 4, text_dim: int = 16, layers: int = 2, seed: int = 0,
                     inject_sample_info: bool = False) -> SkyReelsV2Transformer3DModel:
    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=48, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
        inject_sample_info=inject_sample_info,
    )
    # random weights everywhere (zero-initialised tables would hide modulation bugs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_vae(z_dim: int = 4, seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True], dropout=0.0,
        latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.1 * i for i in range(z_dim)],
    ).eval()
