"""The conditions of the cascade's stages (cascaded diffusion, Ho et al. 2022; Imagen Video, Ho et al. 2022).

A stage is the DiT with condition channels concatenated to its input (models/dit.py):
- tsr: the low-frame-rate clip (every frame_factor-th frame) upsampled in time to the stage's frames, either as a
  latent (linear in latent time) or as pixels (missing frames blended from their neighbours) that the VAE
  re-encodes (cascade.tsr_condition);
- ssr: the low-resolution clip upsampled in space, either as a latent (bilinear) or as pixels (bicubic) that the
  VAE re-encodes (cascade.ssr_condition);
- base with image-to-video: the first frame's latent in latent frame 0 and a mask channel that marks it (the
  causal VAE encodes frame 0 alone, so the image's latent is the clip's first latent frame).

Training makes the condition from the clip itself (`condition_from_clip`); sampling from the previous stage's
latent (`condition_from_latent`). A super-resolution condition is noise-augmented at a level aug (B,) that the
DiT embeds next to c_noise: drawn from [0, aug_max] per sample in training, fixed per stage at sampling, so the
stage learns to correct what the previous stage gets wrong. Shapes: video (B, 3, T, H, W) in [-1, 1], latents
(B, z, T', h, w).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vidiff.config import CascadeConfig, RunConfig
from vidiff.models.vae import TEMPORAL_FACTOR, VideoVAE, latent_frames

# Per-sample random streams beside the training noise (stream 0, diffusion/edm.sample_noise): each is seeded
# from (sample seed, stream), so no draw depends on another or on how the batch is split over ranks.
AUG_STREAM, IMAGE_STREAM = 1, 2


def cond_channels(cfg: RunConfig, latent_channels: int) -> int:
    """Condition channels of the run's stage: a latent for tsr/ssr, a latent and its mask for image-to-video."""
    if cfg.stage != "base":
        return latent_channels
    return latent_channels + 1 if cfg.takes_image else 0


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one sample's draws of one stream; stream 0 is the seed itself."""
    if stream == 0:
        return torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))


def per_frame(fn, video: torch.Tensor) -> torch.Tensor:
    """Apply a (N, C, H, W) -> (N, C, H', W') image operation to every frame of (B, C, T, H, W)."""
    B, C, T = video.shape[:3]
    frames = video.permute(0, 2, 1, 3, 4).flatten(0, 1)                   # (B*T, C, H, W)
    out = fn(frames)
    return out.reshape(B, T, C, *out.shape[-2:]).permute(0, 2, 1, 3, 4)


def drop_frames(video: torch.Tensor, factor: int) -> torch.Tensor:
    """The low-frame-rate clip: every factor-th frame, (B, 3, T, H, W) -> (B, 3, 1 + (T - 1) / factor, H, W)."""
    return video[:, :, ::factor]


def downsample(video: torch.Tensor, factor: int) -> torch.Tensor:
    """The low-resolution clip: area average over factor x factor pixels, (B, 3, T, H, W) -> (.., H/f, W/f)."""
    return per_frame(lambda x: F.avg_pool2d(x, factor), video)


def upsample_frames(video: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling of every frame (the classical baseline, and the pixel SSR condition), in [-1, 1]."""
    return per_frame(lambda x: F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False),
                     video).clamp(-1, 1)


def upsample_video_time(video: torch.Tensor, factor: int) -> torch.Tensor:
    """Linear interpolation in time (the classical baseline, and the pixel tsr condition): (B, 3, T, H, W) ->
    (B, 3, 1 + (T - 1) factor, H, W), each missing frame blended from its two kept neighbours."""
    B, C, T, H, W = video.shape
    flat = video.permute(0, 1, 3, 4, 2).reshape(B, C * H * W, T)
    up = F.interpolate(flat, size=1 + (T - 1) * factor, mode="linear", align_corners=True) if T > 1 else flat
    return up.reshape(B, C, H, W, -1).permute(0, 1, 4, 2, 3)


def upsample_latent_time(latent: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, z, T'_low, h, w) -> (B, z, frames, h, w), linear in time with the first and last latent frames kept
    (they hold the clip's first frame and its end at both rates)."""
    B, z, T, h, w = latent.shape
    flat = latent.permute(0, 1, 3, 4, 2).reshape(B, z * h * w, T)
    up = F.interpolate(flat, size=frames, mode="linear", align_corners=True) if T > 1 else flat.expand(-1, -1, frames)
    return up.reshape(B, z, h, w, frames).permute(0, 1, 4, 2, 3)


def upsample_latent_space(latent: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, z, T', h, w) -> (B, z, T', h f, w f), bilinear per latent frame."""
    return per_frame(lambda x: F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False), latent)


def tsr_frames(low_latent_frames: int, factor: int) -> int:
    """Latent frames of the tsr stage's output from its condition's: the video frames times frame_factor."""
    return latent_frames(1 + (low_latent_frames - 1) * TEMPORAL_FACTOR * factor)


def condition_from_clip(stage: str, cascade: CascadeConfig, vae: VideoVAE, video: torch.Tensor) -> torch.Tensor:
    """A super-resolution stage's clean condition (B, z, T', h, w) at its output latent size, made from the full
    clip (B, 3, T, H, W): its frames dropped (tsr) or its frames downsampled (ssr)."""
    if stage == "tsr":
        low = drop_frames(video, cascade.frame_factor)
        if cascade.tsr_condition == "pixels":
            return vae.encode(upsample_video_time(low, cascade.frame_factor))
        return upsample_latent_time(vae.encode(low), latent_frames(video.shape[2]))
    small = downsample(video, cascade.spatial_factor)
    if cascade.ssr_condition == "latent":
        return upsample_latent_space(vae.encode(small), cascade.spatial_factor)
    return vae.encode(upsample_frames(small, cascade.spatial_factor))


def condition_from_latent(stage: str, cascade: CascadeConfig, vae: VideoVAE, latent: torch.Tensor) -> torch.Tensor:
    """A super-resolution stage's clean condition from the previous stage's output latent (B, z, T', h, w)."""
    if stage == "tsr":
        if cascade.tsr_condition == "pixels":
            return vae.encode(upsample_video_time(vae.decode(latent).clamp(-1, 1), cascade.frame_factor))
        return upsample_latent_time(latent, tsr_frames(latent.shape[2], cascade.frame_factor))
    if cascade.ssr_condition == "latent":
        return upsample_latent_space(latent, cascade.spatial_factor)
    return vae.encode(upsample_frames(vae.decode(latent).clamp(-1, 1), cascade.spatial_factor))


def augment(cond: torch.Tensor, aug: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The noise-augmented condition (cond + aug n) / sqrt(1 + aug^2): unit variance at every level, like the
    latents themselves; aug (B,), noise like cond."""
    level = aug.to(cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
    return (cond + level * noise) / (1 + level**2).sqrt()


def first_frame_condition(first: torch.Tensor | None, given: torch.Tensor, latent_shape: tuple[int, ...]
                          ) -> torch.Tensor:
    """Image-to-video's condition (B, z + 1, T', h, w): where given (B,) bool, the first frame's latent first
    (B, z, h, w) in latent frame 0 and 1 in the mask channel there; zeros elsewhere and for the rest."""
    z, T, h, w = latent_shape
    cond = torch.zeros(len(given), z + 1, T, h, w, device=given.device)
    if first is not None:
        cond[:, :z, 0] = first.float() * given[:, None, None, None]
    cond[:, z, 0] = given.float()[:, None, None]
    return cond


def training_condition(cfg: RunConfig, vae: VideoVAE, x0: torch.Tensor, video: torch.Tensor | None,
                       seeds: list[int]) -> dict[str, torch.Tensor]:
    """The DiT's condition inputs for a training batch ({} for a plain base stage): cond (B, C_cond, T', h, w)
    and aug (B,), each sample's draws from its seed (AUG_STREAM, IMAGE_STREAM)."""
    cascade, device = cfg.cascade, x0.device
    if cfg.stage == "base":
        if not cascade.image_prob:
            return {}
        given = torch.tensor([float(torch.rand(1, generator=stream_generator(s, IMAGE_STREAM))) < cascade.image_prob
                              for s in seeds], device=device)
        cond = first_frame_condition(x0[:, :, 0], given, tuple(x0.shape[1:]))
        return {"cond": cond.to(x0.dtype), "aug": torch.zeros(len(seeds), device=device)}
    if video is None:
        raise ValueError(f"stage {cfg.stage!r} makes its condition from pixel clips; these batches hold cached "
                         "latents (train it on pixel shards)")
    cond = condition_from_clip(cfg.stage, cascade, vae, video)
    levels, noises = [], []
    for seed in seeds:
        generator = stream_generator(seed, AUG_STREAM)
        levels.append(cascade.aug_max * torch.rand(1, generator=generator))
        noises.append(torch.randn(cond.shape[1:], generator=generator))
    aug = torch.cat(levels).to(device)
    return {"cond": augment(cond, aug, torch.stack(noises).to(device, cond.dtype)).to(x0.dtype), "aug": aug}


def sampling_condition(cond: torch.Tensor, aug_sigma: float, seeds: list[int], stream: int
                       ) -> dict[str, torch.Tensor]:
    """A stage's condition inputs at sampling: cond augmented at the stage's fixed level, its noise drawn per
    prompt from (seed, stream)."""
    aug = torch.full((len(seeds),), float(aug_sigma), device=cond.device)
    if aug_sigma == 0:
        return {"cond": cond, "aug": aug}
    noise = torch.stack([torch.randn(cond.shape[1:], generator=stream_generator(s, stream)) for s in seeds])
    return {"cond": augment(cond, aug, noise.to(cond.device, cond.dtype)), "aug": aug}

