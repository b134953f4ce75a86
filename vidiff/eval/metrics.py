"""Reconstruction metrics on videos in [-1, 1], shaped (B, 3, T, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB over the whole batch (peak = the [-1, 1] range)."""
    mse = ((x.clamp(-1, 1) - y) / 2).pow(2).mean()
    return -10 * torch.log10(mse.clamp(min=1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = (g / g.sum()).float()
    return g[:, None] * g[None, :]                                          # (size, size)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03),
    per frame and channel on values mapped to [0, 1], averaged."""
    x = rearrange_frames((x.clamp(-1, 1) + 1) / 2)
    y = rearrange_frames((y.clamp(-1, 1) + 1) / 2)
    window = _gaussian_window().to(x)[None, None]                          # (1, 1, 11, 11)
    pad = window.shape[-1] // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), window)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()


def rearrange_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*C*T, 1, H, W): every frame channel as its own image."""
    B, C, T, H, W = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)
