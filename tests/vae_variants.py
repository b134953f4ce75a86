"""The VAE with random open weights, and deliberately broken variants of its causal machinery: the negative
controls of the chunking, causality and tiling tests (each test must fail on its broken variant)."""

from __future__ import annotations

import torch

from vidiff.config import VAEConfig
from vidiff.models.vae import CausalConv3d, VideoVAE, tile_starts
from weights import randomize

_causal_forward = CausalConv3d.forward


def open_vae(**kw) -> VideoVAE:
    """A small VAE whose every weight is random: the convolutional residual is open."""
    return randomize(VideoVAE(VAEConfig(latent_channels=8, base_channels=16, **kw))).eval()


def forward_without_cache(self: CausalConv3d, x: torch.Tensor, cache=None) -> torch.Tensor:
    """Broken: every chunk pads time with copies of its own first frame, ignoring the previous chunk."""
    return _causal_forward(self, x, None)


def forward_non_causal(self: CausalConv3d, x: torch.Tensor, cache=None) -> torch.Tensor:
    """Broken: time padded on both sides, so each output frame also sees the next one."""
    half = self.pad_t // 2
    x = torch.cat([x[:, :, :1].expand(-1, -1, self.pad_t - half, -1, -1), x,
                   x[:, :, -1:].expand(-1, -1, half, -1, -1)], dim=2)
    return self.conv(x)


def tiled_without_blending(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Broken: overlapping tiles pasted one over the other, with no blending."""
    H, W = x.shape[-2:]
    out = None
    for top in tile_starts(H, tile, overlap):
        for left in tile_starts(W, tile, overlap):
            y = fn(x[..., top:top + tile, left:left + tile])
            if out is None:
                out = y.new_zeros(*y.shape[:-2], round(H * scale), round(W * scale))
            r, c = round(top * scale), round(left * scale)
            out[..., r:r + y.shape[-2], c:c + y.shape[-1]] = y
    return out


