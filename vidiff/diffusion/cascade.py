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
def sample_base(denoise: Denoiser, encode_text: TextEncode, prompts: list[str], seeds: list[int],
                latent_shape: tuple[int, ...], sample: SampleConfig, edm: EDMConfig) -> torch.Tensor:
    """Prompts -> latents (B, C, T', h, w) by EDM Heun sampling with classifier-free guidance, as one batch on
    the text encoder's device. Each prompt's noise comes from its own seed, drawn on the CPU: a (prompt, seed)
    gives the same start on any device and in any batch, and two prompts with one seed share their noise."""
    text, mask = encode_text(prompts)
    null_text, null_mask = encode_text([""] * len(prompts))
    denoise_cfg = guided(denoise, {"text": text, "text_mask": mask},
                         {"text": null_text, "text_mask": null_mask}, sample.guidance)
    sigmas = karras_sigmas(sample.steps, edm.sigma_min, edm.sigma_max, edm.rho)
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    generator = torch.Generator().manual_seed(seeds[0])                      # the churn's draws (S_churn > 0)
    x = (noise * sigmas[0].float()).to(text.device)
    return sample_heun(denoise_cfg, x, sigmas, generator=generator, S_churn=sample.S_churn)


@torch.no_grad()
def generate(denoise: Denoiser, encode_text: TextEncode, decode: Decode, prompts: list[str],
             latent_shape: tuple[int, ...], sample: SampleConfig, edm: EDMConfig, seeds: list[int] | None = None,
             batch: int = 8, show_progress: bool = True) -> list[torch.Tensor]:
    """Prompts -> videos (3, T, H, W) in [-1, 1]; prompt i's noise comes from seeds[i] (default sample.seed + i),
    sampled batch prompts at a time."""
    seeds = seeds if seeds is not None else [sample.seed + i for i in range(len(prompts))]
    videos = []
    starts = range(0, len(prompts), batch)
    for i in progress(starts, desc="sample", unit="batch", disable=not show_progress or len(starts) == 1):
        latent = sample_base(denoise, encode_text, prompts[i:i + batch], seeds[i:i + batch], latent_shape, sample,
                             edm)
        videos += list(decode(latent).clamp(-1, 1))
    return videos
