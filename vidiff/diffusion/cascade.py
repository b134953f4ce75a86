"""Cascaded text-to-video sampling: base stage -> temporal SR -> spatial SR -> VAE decode.

Each stage is EDM Heun sampling with classifier-free guidance of its own denoiser; a super-resolution stage is
conditioned on the previous stage's latent lifted to its size (diffusion/conditions.py), augmented at the stage's
fixed level. This module sees only callables and tensors: denoisers D(x, sigma, text, text_mask[, cond, aug]), a
text encoder and the VAE; vidiff/sampling.py loads the stages' runs and writes the files.

Noise: prompt i samples from seeds[i] at every stage, each stage (and its condition's augmentation) from its own
stream of that seed, drawn on the CPU: a (prompt, seed) gives the same clip on any device, in any batch and on
any rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from vidiff.config import EDMConfig, RunConfig, SampleConfig, StageSampleConfig
from vidiff.diffusion.conditions import (condition_from_latent, first_frame_condition, sampling_condition,
                                         stream_generator)
from vidiff.diffusion.edm import Denoiser
from vidiff.diffusion.samplers import guided, karras_sigmas, sample_heun
from vidiff.models.vae import VideoVAE, latent_shape
from vidiff.progress import progress

TextEncode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
Decode = Callable[[torch.Tensor], torch.Tensor]
STAGE_STREAMS = 10             # stage k draws its noise from stream 10 k and its condition's from 10 k + 1


def seeded_noise(seeds: list[int], shape: tuple[int, ...], stream: int = 0) -> torch.Tensor:
    """(B, *shape) standard normal noise on the CPU, sample i from stream `stream` of seeds[i]."""
    return torch.stack([torch.randn(shape, generator=stream_generator(seed, stream)) for seed in seeds])


@torch.no_grad()
def sample_latents(denoise: Denoiser, encode_text: TextEncode, prompts: list[str], seeds: list[int],
                   shape: tuple[int, ...], steps: int, guidance: float, edm: EDMConfig, S_churn: float = 0.0,
                   cond: dict[str, torch.Tensor] | None = None, stream: int = 0,
                   start: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Prompts -> latents (B, *shape) by EDM Heun sampling with classifier-free guidance, as one batch on the text
    encoder's device. cond (a cascade stage's cond and aug, moved to that device) goes to both branches of
    guidance: guidance steers by the text, a stage always sees its condition. start (x (B, *shape), sigma): begin
    at x noised to sigma, then down the rho schedule from sigma (SDEdit, Meng et al. 2022), instead of from pure
    noise at edm.sigma_max."""
    text, mask = encode_text(prompts)
    cond = {k: v.to(text.device) for k, v in (cond or {}).items()}
    null_text, null_mask = encode_text([""] * len(prompts))
    denoise_cfg = guided(denoise, {"text": text, "text_mask": mask, **cond},
                         {"text": null_text, "text_mask": null_mask, **cond}, guidance)
    sigmas = karras_sigmas(steps, edm.sigma_min, edm.sigma_max if start is None else start[1], edm.rho)
    generator = stream_generator(seeds[0], stream)                         # the churn's draws (S_churn > 0)
    x = (seeded_noise(seeds, shape, stream) * sigmas[0].float()).to(text.device)
    if start is not None:
        x = x + start[0].to(x)
    return sample_heun(denoise_cfg, x, sigmas, generator=generator, S_churn=S_churn)


def evaluations_per_clip(steps: int, guidance: float) -> int:
    """Network evaluations per clip of a Heun sampler: 2 steps - 1, twice with guidance's unconditional pass."""
    return (2 * steps - 1) * (1 if guidance == 1 else 2)


def image_condition(batch: int, shape: tuple[int, ...], image_latent: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """An image-to-video base stage's inputs: the image's latent (z, h, w) as every sample's first frame, or
    (None) no frame given: text alone."""
    device = image_latent.device if image_latent is not None else "cpu"
    given = torch.full((batch,), image_latent is not None, dtype=torch.bool, device=device)
    first = image_latent.expand(batch, -1, -1, -1) if image_latent is not None else None
    return {"cond": first_frame_condition(first, given, shape), "aug": torch.zeros(batch, device=device)}


@torch.no_grad()
def generate(denoise: Denoiser, encode_text: TextEncode, decode: Decode, prompts: list[str],
             latent_shape: tuple[int, ...], sample: SampleConfig, edm: EDMConfig, seeds: list[int] | None = None,
             batch: int = 8, show_progress: bool = True, image_channels: bool = False) -> list[torch.Tensor]:
    """One model's prompts -> videos (3, T, H, W) in [-1, 1]; prompt i's noise comes from seeds[i] (default
    sample.seed + i), sampled batch prompts at a time. image_channels: the model is an image-to-video base stage,
    sampled here from text alone."""
    seeds = seeds if seeds is not None else [sample.seed + i for i in range(len(prompts))]
    videos = []
    starts = range(0, len(prompts), batch)
    for i in progress(starts, desc="sample", unit="batch", disable=not show_progress or len(starts) == 1):
        chunk = prompts[i:i + batch]
        cond = image_condition(len(chunk), latent_shape) if image_channels else None
        latent = sample_latents(denoise, encode_text, chunk, seeds[i:i + batch], latent_shape, sample.steps,
                                sample.guidance, edm, sample.S_churn, cond)
        videos += list(decode(latent).clamp(-1, 1))
    return videos


@dataclass
class Stage:
    """One loaded stage: its name (base | tsr | ssr), denoiser, run config (cascade settings, EDM, bucket) and
    sampling settings."""
    name: str
    denoise: Denoiser
    run: RunConfig
    sample: StageSampleConfig


def stage_latents(stage: Stage, index: int, encode_text: TextEncode, prompts: list[str], seeds: list[int],
                  clean: torch.Tensor, S_churn: float = 0.0) -> torch.Tensor:
    """A super-resolution stage (the cascade's index-th) -> its output latents, from its clean condition
    (B, z, T', h, w) at the output's latent size: the condition augmented at the stage's fixed level; sampled
    from pure noise, or (start_sigma) from the clean condition noised to that level."""
    cond = sampling_condition(clean, stage.sample.aug_sigma, seeds, STAGE_STREAMS * index + 1)
    start = None if stage.sample.start_sigma is None else (clean, stage.sample.start_sigma)
    return sample_latents(stage.denoise, encode_text, prompts, seeds, tuple(clean.shape[1:]), stage.sample.steps,
                          stage.sample.guidance, stage.run.edm, S_churn, cond, stream=STAGE_STREAMS * index,
                          start=start)


@torch.no_grad()
def run_cascade(stages: list[Stage], encode_text: TextEncode, vae: VideoVAE, prompts: list[str], seeds: list[int],
                image_latent: torch.Tensor | None = None, S_churn: float = 0.0,
                seconds: dict[str, float] | None = None) -> list[torch.Tensor]:
    """Prompts -> each stage's output latents (B, z, T', h, w), base first. image_latent (z, h, w): the first
    frame's latent for an image-to-video base stage. The base samples its bucket (with the image's latent in
    frame 0 where given); each later stage is conditioned on the previous stage's output lifted to its size.
    seconds: each stage's wall time is added under its name."""
    outputs: list[torch.Tensor] = []
    for index, stage in enumerate(stages):
        start = time.perf_counter()
        if stage.name == "base":
            shape = latent_shape(*stage.run.data.video_shape, vae.cfg.latent_channels)
            cond = image_condition(len(seeds), shape, image_latent) if stage.run.takes_image else {}
            outputs.append(sample_latents(stage.denoise, encode_text, prompts, seeds, shape, stage.sample.steps,
                                          stage.sample.guidance, stage.run.edm, S_churn, cond))
        else:
            clean = condition_from_latent(stage.name, stage.run.cascade, vae, outputs[-1])
            outputs.append(stage_latents(stage, index, encode_text, prompts, seeds, clean, S_churn))
        if seconds is not None:
            seconds[stage.name] = seconds.get(stage.name, 0.0) + time.perf_counter() - start
    return outputs
