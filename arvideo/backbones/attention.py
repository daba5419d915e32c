"""Attention kernels: torch SDPA always; flash-attn when installed, on CUDA, in half precision."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..errors import ConfigError

BACKENDS = ("auto", "sdpa", "flash")
_FLASH = importlib.util.find_spec("flash_attn") is not None


def flash_available() -> bool:
    return _FLASH and torch.cuda.is_available()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Unmasked attention, q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d]."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    use_flash = backend == "flash" or (
        backend == "auto" and _FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    )
    if use_flash:
        if not flash_available():
            raise ConfigError("attention backend 'flash' needs flash-attn and a CUDA device; use 'sdpa'")
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
