"""Cascaded text-to-video sampling: base stage -> (temporal SR -> spatial SR) -> VAE decode.

The base stage is here; the super-resolution stages slot in between base and decode. This module sees
only callables: a denoiser D(x, sigma, text, text_mask), a text encoder and a latent decoder.
"""

from __future__ import annotations

from typing import Callable

import torch

from vidiff.config import EDMConfig, SampleConfig
from vidiff.diffusion.edm import Denoiser
from vidiff.diffusion.samplers import guided, karras_sigmas, sample_heun
from vidiff.progress import progress

TextEncode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
Decode = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_base(denoise: Denoiser, encode_text: TextEncode, prompt: str, latent_shape: tuple[int, ...],
                sample: SampleConfig, edm: EDMConfig, generator: torch.Generator) -> torch.Tensor:
    """One prompt -> latent (1, C, T', h, w) by EDM Heun sampling with classifier-free guidance, on the text
    encoder's device; the noise is drawn on the CPU, so a seed gives the same start on any device."""
    text, mask = encode_text([prompt])
    null_text, null_mask = encode_text([""])
    denoise_cfg = guided(denoise, {"text": text, "text_mask": mask},
                         {"text": null_text, "text_mask": null_mask}, sample.guidance)
    sigmas = karras_sigmas(sample.steps, edm.sigma_min, edm.sigma_max, edm.rho)
    x = (torch.randn((1, *latent_shape), generator=generator) * sigmas[0].float()).to(text.device)
    return sample_heun(denoise_cfg, x, sigmas, generator=generator, S_churn=sample.S_churn)


@torch.no_grad()
def generate(denoise: Denoiser, encode_text: TextEncode, decode: Decode, prompts: list[str],
             latent_shape: tuple[int, ...], sample: SampleConfig, edm: EDMConfig,
             show_progress: bool = True) -> list[torch.Tensor]:
    """Prompts -> videos (3, T, H, W) in [-1, 1], reproducible from sample.seed."""
    generator = torch.Generator().manual_seed(sample.seed)
    videos = []
    for prompt in progress(prompts, desc="sample", unit="clip", disable=not show_progress):
        latent = sample_base(denoise, encode_text, prompt, latent_shape, sample, edm, generator)
        videos.append(decode(latent)[0].clamp(-1, 1))
    return videos
