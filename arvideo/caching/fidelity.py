"""Fidelity of a cached video to the full-compute one: PSNR and SSIM on uint8 frames."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_IDENTICAL = 100.0  # reported for bit-equal videos (MSE 0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 videos [F, H, W, 3] over all their pixels (equal shapes)."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_IDENTICAL if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, batch: int = 64) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid
    region) of uint8 videos [F, H, W, 3], per channel, averaged over frames and channels."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    window = _gaussian()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    total, count = 0.0, 0
    for start in range(0, len(a), batch):
        x = torch.from_numpy(a[start:start + batch]).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3]).double()
        y = torch.from_numpy(b[start:start + batch]).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3]).double()
        mx, my = F.conv2d(x, window), F.conv2d(y, window)
        sxx = F.conv2d(x * x, window) - mx**2
        syy = F.conv2d(y * y, window) - my**2
        sxy = F.conv2d(x * y, window) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        total += s.mean(dim=(1, 2, 3)).sum().item()
        count += x.shape[0]
    return total / count
