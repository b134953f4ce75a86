"""Causal 3D convolutional VAE: 4x in time, 8x8 in space; 1 + 4k frames <-> 1 + k latent frames.

Causality: every convolution pads time on the left only and normalization is per position, so latent
frame t depends on video frames <= 4t only, and the first frame is encoded on its own (an image is a 1-frame
video). Because of that, a long clip can be encoded in chunks that carry each convolution's last frames
(the same latents as whole, memory flat in length), and large frames in blended spatial tiles.
The latent's scale/shift statistics live here and only here (`encode` / `decode`).

Architecture: the latent is a linear map of each 4x8x8 block plus a convolutional residual that starts at zero
(and the decoder mirrors it). The linear path is a PCA of blocks: learned, it reaches ~25 dB on held-out video in
a few hundred steps, where a purely convolutional VAE of the same cost sat at ~16 dB; computed from training
batches and frozen (vae.pca_init_batches, `block_pca`), it starts training at ~28.6 dB. The residual works from a
2x2 space-to-channel input and downsamples by space(-time)-to-channel with DC-AE's averaging shortcuts (Chen et
al. 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidiff.config import VAEConfig
from vidiff.models.init import Conv3d

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4


def latent_shape(frames: int, height: int, width: int, latent_channels: int) -> tuple[int, int, int, int]:
    """(z, T', H/8, W/8) of the latent of one clip of (frames, height, width)."""
    return latent_channels, latent_frames(frames), height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


def latent_frames(frames: int) -> int:
    """1 + 4k video frames -> 1 + k latent frames."""
    if frames != 1 and (frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"the causal VAE takes 1 + 4k frames (1, 5, 9, ...), got {frames}")
    return 1 + (frames - 1) // TEMPORAL_FACTOR


def video_frames(latent_t: int) -> int:
    return 1 + (latent_t - 1) * TEMPORAL_FACTOR


# Streaming state: each causal convolution keeps its last (kernel - 1) input frames between chunks.
Cache = dict


class CausalConv3d(nn.Module):
    """3D convolution over (T, H, W) that sees only current and past frames. The first chunk pads time on
    the left with copies of frame 0; later chunks are padded with the previous chunk's last frames."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3):
        super().__init__()
        self.pad_t = kernel - 1
        self.conv = Conv3d(c_in, c_out, kernel, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:   # (B, C, T, H, W)
        if self.pad_t:
            past = cache.get(self) if cache is not None else None
            if past is None:
                past = x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1)
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.pad_t:].clone()     # a copy: a view would keep all of x alive
        return self.conv(x)


class ChannelNorm(nn.Module):
    """RMS norm over channels at each (t, h, w): local, so chunks and tiles see the same statistics."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # (B, C, T, H, W)
        rms = x.pow(2).mean(1, keepdim=True).add(self.eps).rsqrt()
        return x * rms * self.weight.reshape(1, -1, 1, 1, 1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = ChannelNorm(c_in), CausalConv3d(c_in, c_out)
        self.norm2, self.conv2 = ChannelNorm(c_out), CausalConv3d(c_out, c_out)
        self.skip = Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache | None = None, first: bool = True) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


def to_channels(x: torch.Tensor, temporal: bool, first: bool = True) -> torch.Tensor:
    """Space(-time)-to-channel: (B, C, T, H, W) -> (B, 4C, T, H/2, W/2), or with temporal=True
    (B, C, 1 + 2m, H, W) -> (B, 8C, 1 + m, H/2, W/2), frame 0 paired with itself (the first frame is encoded on
    its own). A later chunk (first=False) has no frame 0: (B, C, 2m, ...) -> (B, 8C, m, ...). Channels are
    ordered (c, pt, ph, pw), so consecutive channels come from one input channel."""
    if temporal and first:
        x = torch.cat([x[:, :, :1], x], dim=2)
    pt = 2 if temporal else 1
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w", pt=pt, ph=2, pw=2)


def from_channels(x: torch.Tensor, temporal: bool, first: bool = True) -> torch.Tensor:
    """Inverse of to_channels; with temporal=True and first, frame 0's duplicate is dropped."""
    pt = 2 if temporal else 1
    x = rearrange(x, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)", pt=pt, ph=2, pw=2)
    return x[:, :, 1:] if temporal and first else x


def group_mean(x: torch.Tensor, c_out: int) -> torch.Tensor:
    """(B, C, ...) -> (B, c_out, ...): the mean of each run of C / c_out consecutive channels."""
    return x.unflatten(1, (c_out, -1)).mean(2)


def repeat_channels(x: torch.Tensor, c_out: int) -> torch.Tensor:
    """(B, C, ...) -> (B, c_out, ...): each channel repeated c_out / C times in a run (group_mean's inverse)."""
    return x.repeat_interleave(c_out // x.shape[1], dim=1)


class Down(nn.Module):
    """Halve H and W (and T when temporal) into c_out channels: a convolution of the space-to-channel
    rearrangement plus a parameter-free shortcut that averages its channel groups (DC-AE, Chen et al. 2024), so
    the encoder starts near an average-pooling path and learns the residual."""

    def __init__(self, c_in: int, c_out: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(c_in * (8 if temporal else 4), c_out)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, first: bool = True) -> torch.Tensor:
        s = to_channels(x, self.temporal, first)
        return self.conv(s, cache) + group_mean(s, self.conv.conv.out_channels)


class Up(nn.Module):
    """Double H and W (and T when temporal) into c_out channels: a convolution to c_out x (4 or 8) channels
    rearranged channel-to-space, plus a shortcut that repeats channels the same way (DC-AE)."""

    def __init__(self, c_in: int, c_out: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(c_in, c_out * (8 if temporal else 4))

    def forward(self, x: torch.Tensor, cache: Cache | None = None, first: bool = True) -> torch.Tensor:
        y = self.conv(x, cache)
        return from_channels(y + repeat_channels(x, y.shape[1]), self.temporal, first)


PATCH_CHANNELS = 3 * TEMPORAL_FACTOR * SPATIAL_FACTOR ** 2      # one 4x8x8 RGB block as channels: 768
LOGVAR_INIT = -8.0       # posterior log-variance of a PCA-initialized encoder: noise far below the code's scale


def to_blocks(video: torch.Tensor, first: bool = True) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B, 768, T', H/8, W/8): each 4x8x8 block as channels (frame 0: its 8x8 block repeated
    in time), the input of the encoder's linear path; `unblock` is the inverse."""
    x = to_channels(video, temporal=False)                              # (B, 12, T, H/2, W/2)
    return to_channels(to_channels(x, True, first), True, first)


def unblock(blocks: torch.Tensor, first: bool = True) -> torch.Tensor:
    """(B, 768, T', h, w) -> (B, 12, T, 4h, 4w): to_blocks' inverse up to the last space-to-channel step."""
    return from_channels(from_channels(blocks, True, first), True, first)


BlockPCA = tuple[torch.Tensor, torch.Tensor]      # mean (768,), principal directions (768, z)


def block_pca(videos: list[torch.Tensor], z: int) -> BlockPCA:
    """The mean and top-z principal directions of the 4x8x8 blocks of videos (each (B, 3, 1 + 4k, H, W)): the
    best linear code of z channels for those blocks, the linear path's starting point (vae.pca_init_batches)."""
    blocks = torch.cat([to_blocks(v).movedim(1, -1).reshape(-1, PATCH_CHANNELS) for v in videos]).double()
    mean = blocks.mean(0)
    covariance = (blocks - mean).T @ (blocks - mean) / len(blocks)
    _, vectors = torch.linalg.eigh(covariance)                          # eigenvalues ascending
    return mean.float(), vectors[:, -z:].flip(1).float()                # (768,), (768, z)


def pca_reconstruction(video: torch.Tensor, pca: BlockPCA) -> torch.Tensor:
    """(B, 3, 1 + 4k, H, W) -> the same, each 4x8x8 block (frame 0: 8x8) replaced by its projection on the PCA's
    directions: the best linear code of that many coefficients per block, with no learning beyond the PCA."""
    mean, U = pca
    blocks = to_blocks(video).movedim(1, -1)                                # (B, T', h, w, 768)
    projected = (blocks - mean) @ U @ U.T + mean
    return from_channels(unblock(projected.movedim(-1, 1)), temporal=False)


class Encoder(nn.Module):
    """(B, 3, T, H, W) -> (B, 2z, T', H/8, W/8): a linear map of each 4x8x8 block (frame 0: an 8x8 block of the
    first frame alone) plus a causal convolutional residual, zero at initialization. The linear path is a PCA of
    blocks (learned, or given as `pca`); the residual adds what a linear code cannot hold.
    The residual works from the 2x2 space-to-channel input at H/2 (cheap on full frames): channels c, 2c, 4c at
    H/2, H/4, H/8."""

    def __init__(self, c: int, z: int, pca: BlockPCA | None = None):
        super().__init__()
        self.patch = Conv3d(PATCH_CHANNELS, 2 * z, 1)
        if pca is not None:                        # mean = U^T (block - mu); log-variance LOGVAR_INIT
            mu, U = pca
            with torch.no_grad():
                self.patch.weight.zero_()
                self.patch.weight[:z, :, 0, 0, 0] = U.T
                self.patch.bias[:z] = -(U.T @ mu)
                self.patch.bias[z:] = LOGVAR_INIT
        self.conv_in = CausalConv3d(12, c)
        self.blocks = nn.ModuleList([
            ResBlock(c, c), Down(c, 2 * c, temporal=True),
            ResBlock(2 * c, 2 * c), Down(2 * c, 4 * c, temporal=True),
            ResBlock(4 * c, 4 * c), ResBlock(4 * c, 4 * c),
        ])
        self.norm_out, self.conv_out = ChannelNorm(4 * c), CausalConv3d(4 * c, 2 * z)
        nn.init.zeros_(self.conv_out.conv.weight)
        nn.init.zeros_(self.conv_out.conv.bias)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, first: bool = True) -> torch.Tensor:
        blocks = to_blocks(x, first)                                        # (B, 768, T', H/8, W/8)
        x = to_channels(x, temporal=False)                                 # (B, 12, T, H/2, W/2)
        h = self.conv_in(x, cache)                                          # (B, c, T, H/2, W/2)
        for block in self.blocks:
            h = block(h, cache, first)                                      # -> (B, 4c, T', H/8, W/8)
        return self.patch(blocks) + self.conv_out(F.silu(self.norm_out(h)), cache)   # (B, 2z, T', H/8, W/8)


class Decoder(nn.Module):
    """(B, z, T', h, w) -> (B, 3, T, 8h, 8w): the linear block map back plus a causal convolutional residual
    (zero at initialization), mirroring the encoder."""

    def __init__(self, c: int, z: int, pca: BlockPCA | None = None):
        super().__init__()
        self.patch = Conv3d(z, PATCH_CHANNELS, 1)
        if pca is not None:                        # block = mu + U code: the PCA reconstruction
            mu, U = pca
            with torch.no_grad():
                self.patch.weight.copy_(U[:, :, None, None, None])
                self.patch.bias.copy_(mu)
        self.conv_in = CausalConv3d(z, 4 * c)
        self.blocks = nn.ModuleList([
            ResBlock(4 * c, 4 * c), ResBlock(4 * c, 4 * c),
            Up(4 * c, 2 * c, temporal=True), ResBlock(2 * c, 2 * c),
            Up(2 * c, c, temporal=True), ResBlock(c, c),
        ])
        self.norm_out, self.conv_out = ChannelNorm(c), CausalConv3d(c, 12)
        nn.init.zeros_(self.conv_out.conv.weight)
        nn.init.zeros_(self.conv_out.conv.bias)

    def forward(self, z: torch.Tensor, cache: Cache | None = None, first: bool = True) -> torch.Tensor:
        linear = unblock(self.patch(z), first)                              # (B, 12, T, 4h, 4w)
        h = self.conv_in(z, cache)                                          # (B, 4c, T', h, w)
        for block in self.blocks:
            h = block(h, cache, first)                                      # -> (B, c, T, 4h, 4w)
        residual = self.conv_out(F.silu(self.norm_out(h)), cache)           # (B, 12, T, 4h, 4w)
        return from_channels(linear + residual, temporal=False)            # (B, 3, T, 8h, 8w)


def chunk_bounds(frames: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of causal chunks: 1 + chunk frames first, then chunk frames each (the last may be shorter)."""
    bounds, start = [], 0
    while start < frames:
        stop = min(frames, start + chunk + (1 if start == 0 else 0))
        bounds.append((start, stop))
        start = stop
    return bounds


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(n: int, lo: int, hi: int) -> torch.Tensor:
    """Blend weights along one tile side. Over an overlap with a neighbour the weight is ~0 for the 3/8 nearest
    the tile's edge (where the missing context distorts the output), rises linearly over the middle quarter,
    and is 1 beyond: each tile is trusted where it saw context on both sides, seams are still blended."""
    def rise(m: int) -> torch.Tensor:
        margin = 3 * m // 8
        return torch.cat([torch.full((margin,), 1e-6), torch.linspace(0, 1, m - 2 * margin + 2)[1:-1],
                          torch.ones(margin)])

    w = torch.ones(n)
    if lo:
        w[:lo] = rise(lo)
    if hi:
        w[n - hi:] = rise(hi).flip(0)
    return w


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply fn to overlapping spatial tiles of x (B, C, T, H, W) and blend the results linearly; fn maps a
    tile of side s to one of side s * scale."""
    H, W = x.shape[-2:]
    out = weight = None
    for top in tile_starts(H, tile, overlap):
        for left in tile_starts(W, tile, overlap):
            y = fn(x[..., top:top + tile, left:left + tile])
            h, w = y.shape[-2:]
            ov = round(overlap * scale)
            wy = _ramp(h, ov if top else 0, ov if top + tile < H else 0)
            wx = _ramp(w, ov if left else 0, ov if left + tile < W else 0)
            mask = (wy[:, None] * wx[None]).to(y)                          # (h, w)
            if out is None:
                out = y.new_zeros(*y.shape[:-2], round(H * scale), round(W * scale))
                weight = y.new_zeros(round(H * scale), round(W * scale))
            r, c = round(top * scale), round(left * scale)
            out[..., r:r + h, c:c + w] += y * mask
            weight[r:r + h, c:c + w] += mask
    return out / weight


class VideoVAE(nn.Module):
    """Encoder interface: encode(video in [-1, 1]) -> normalized latent; decode(latent) -> video.

    encode/decode run causal chunks of cfg.chunk_frames frames (memory flat in clip length, same result as
    whole) and, when cfg.tile_size is set, overlapping spatial tiles blended linearly (large frames)."""

    def __init__(self, cfg: VAEConfig, pca: BlockPCA | None = None):
        """pca: the linear block path is this PCA of training blocks (`block_pca`), so encode -> decode begins as
        the best linear code; the convolutional residuals start at zero either way. With cfg.pca_init_batches
        the linear path is frozen (a resumed run loads it): under Adam at the recipe's learning rate it drifted
        from 28.6 to 27.1 dB on held-out video in 2000 steps, while the residuals can add any correction."""
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.base_channels, cfg.latent_channels, pca)
        self.decoder = Decoder(cfg.base_channels, cfg.latent_channels, pca)
        if cfg.pca_init_batches:
            self.encoder.patch.requires_grad_(False)
            self.decoder.patch.requires_grad_(False)
        # Per-channel statistics of the posterior means, set by calibration after training.
        self.register_buffer("latent_shift", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_scale", torch.ones(cfg.latent_channels))

    @staticmethod
    def _check(video: torch.Tensor) -> None:
        latent_frames(video.shape[2])
        if video.shape[-1] % SPATIAL_FACTOR or video.shape[-2] % SPATIAL_FACTOR:
            raise ValueError(f"height and width must be multiples of {SPATIAL_FACTOR}, got {tuple(video.shape[-2:])}")

    def moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior N(mean, exp(logvar)) of the raw latent, in one pass; video (B, 3, 1 + 4k, H, W), cast to the
        weights' dtype (bf16 training)."""
        self._check(video)
        mean, logvar = self.encoder(video.to(self.encoder.patch.weight.dtype)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, video: torch.Tensor, noise: torch.Tensor | None = None):
        """Training pass: (reconstruction, posterior mean, posterior logvar). The reconstruction decodes the
        posterior sample mean + std * noise (noise like the mean, drawn by the caller), or the mean without noise."""
        mean, logvar = self.moments(video)
        z = mean if noise is None else mean + (0.5 * logvar).exp() * noise.to(mean)
        return self.decoder(z), mean, logvar

    def _stream(self, net: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Run a causal net over time chunks of x, carrying each convolution's past frames."""
        cache: Cache = {}
        parts = [net(x[:, :, a:b], cache, first=(a == 0)) for a, b in chunk_bounds(x.shape[2], chunk)]
        return torch.cat(parts, dim=2)

    def _spatial(self, fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
        if not self.cfg.tile_size or max(x.shape[-2:]) <= tile:
            return fn(x)
        return tiled(fn, x, tile, overlap, scale)

    def _bcast(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.reshape(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> (B, z, 1 + k, H/8, W/8), about zero mean and unit variance."""
        self._check(video)

        def encode_tile(x: torch.Tensor) -> torch.Tensor:
            return self._stream(self.encoder, x, self.cfg.chunk_frames)[:, : self.cfg.latent_channels]

        cfg = self.cfg
        mean = self._spatial(encode_tile, video, cfg.tile_size, cfg.tile_overlap, 1 / SPATIAL_FACTOR)
        return (mean - self._bcast(self.latent_shift)) / self._bcast(self.latent_scale)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of encode: (B, z, T', h, w) -> (B, 3, 1 + 4(T' - 1), 8h, 8w) in about [-1, 1]."""
        raw = latent * self._bcast(self.latent_scale) + self._bcast(self.latent_shift)

        def decode_tile(z: torch.Tensor) -> torch.Tensor:
            return self._stream(self.decoder, z, self.cfg.chunk_frames // TEMPORAL_FACTOR)

        cfg = self.cfg
        return self._spatial(decode_tile, raw, cfg.tile_size // SPATIAL_FACTOR, cfg.tile_overlap // SPATIAL_FACTOR,
                             SPATIAL_FACTOR)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) of each element (shape of mean)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
