"""Causal 3D convolutional VAE: 4x in time, 8x8 in space; 1 + 4k frames <-> 1 + k latent frames.

Causality: every convolution pads time on the left only and normalization is per frame, so frame t of
the latent depends on frames <= t of the video, and the first frame is encoded on its own (an image is a
1-frame video). The latent's scale/shift statistics live here and only here (`encode` / `decode`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidiff.config import VAEConfig

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4


def latent_frames(frames: int) -> int:
    """1 + 4k video frames -> 1 + k latent frames."""
    if frames != 1 and (frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"the causal VAE takes 1 + 4k frames (1, 5, 9, ...), got {frames}")
    return 1 + (frames - 1) // TEMPORAL_FACTOR


def video_frames(latent_t: int) -> int:
    return 1 + (latent_t - 1) * TEMPORAL_FACTOR


class CausalConv3d(nn.Module):
    """3D convolution over (T, H, W) that sees only current and past frames (left time padding by frame 0)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3):
        super().__init__()
        self.pad_t = kernel - 1
        self.conv = nn.Conv3d(c_in, c_out, kernel, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # (B, C, T, H, W)
        if self.pad_t:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1), x], dim=2)
        return self.conv(x)


class FrameNorm(nn.GroupNorm):
    """GroupNorm applied to each frame on its own (statistics across time would break causality)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # (B, C, T, H, W)
        B = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=B)


def _norm(c: int) -> FrameNorm:
    return FrameNorm(min(8, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), CausalConv3d(c_in, c_out)
        self.norm2, self.conv2 = _norm(c_out), CausalConv3d(c_out, c_out)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def time_down(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1 + 2m, H, W) -> (B, C, 1 + m, H, W): frame 0 alone, then the mean of each later pair."""
    first, rest = x[:, :, :1], x[:, :, 1:]
    rest = rearrange(rest, "b c (m two) h w -> b c m two h w", two=2).mean(3)
    return torch.cat([first, rest], dim=2)


def time_up(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1 + m, H, W) -> (B, C, 1 + 2m, H, W): frame 0 alone, each later frame twice."""
    return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)


class Down(nn.Module):
    def __init__(self, c: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv3d(c, c, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(time_down(x) if self.temporal else x)


class Up(nn.Module):
    def __init__(self, c: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = time_up(x) if self.temporal else x
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, c: int, z: int):
        super().__init__()
        self.conv_in = CausalConv3d(3, c)
        self.blocks = nn.ModuleList([
            ResBlock(c, c), Down(c, temporal=True),
            ResBlock(c, 2 * c), Down(2 * c, temporal=True),
            ResBlock(2 * c, 4 * c), Down(4 * c, temporal=False),
            ResBlock(4 * c, 4 * c),
        ])
        self.norm_out, self.conv_out = _norm(4 * c), CausalConv3d(4 * c, 2 * z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # (B, 3, T, H, W)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))                     # (B, 2z, T', H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, c: int, z: int):
        super().__init__()
        self.conv_in = CausalConv3d(z, 4 * c)
        self.blocks = nn.ModuleList([
            ResBlock(4 * c, 4 * c),
            Up(4 * c, temporal=False), ResBlock(4 * c, 2 * c),
            Up(2 * c, temporal=True), ResBlock(2 * c, c),
            Up(c, temporal=True), ResBlock(c, c),
        ])
        self.norm_out, self.conv_out = _norm(c), CausalConv3d(c, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:                    # (B, z, T', h, w)
        h = self.conv_in(z)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))                     # (B, 3, T, 8h, 8w)


class VideoVAE(nn.Module):
    """Encoder interface: encode(video in [-1, 1]) -> normalized latent; decode(latent) -> video."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.base_channels, cfg.latent_channels)
        self.decoder = Decoder(cfg.base_channels, cfg.latent_channels)
        # Per-channel statistics of the posterior means, set by calibration after training.
        self.register_buffer("latent_shift", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_scale", torch.ones(cfg.latent_channels))

    def moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior N(mean, exp(logvar)) of the raw latent; video (B, 3, 1 + 4k, H, W)."""
        latent_frames(video.shape[2])
        if video.shape[-1] % SPATIAL_FACTOR or video.shape[-2] % SPATIAL_FACTOR:
            raise ValueError(f"height and width must be multiples of {SPATIAL_FACTOR}, got {tuple(video.shape[-2:])}")
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction, posterior mean, posterior logvar)."""
        mean, logvar = self.moments(video)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decoder(mean + (0.5 * logvar).exp() * eps), mean, logvar

    def _bcast(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.reshape(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> (B, z, 1 + k, H/8, W/8), about zero mean and unit variance."""
        mean, _ = self.moments(video)
        return (mean - self._bcast(self.latent_shift)) / self._bcast(self.latent_scale)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of encode: (B, z, T', h, w) -> (B, 3, 1 + 4(T' - 1), 8h, 8w) in about [-1, 1]."""
        return self.decoder(latent * self._bcast(self.latent_scale) + self._bcast(self.latent_shift))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per element, averaged."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
