"""What a run trains: the VAE (reconstruction + KL) or the DiT (EDM loss on VAE latents).

An objective builds the trainable module, turns a batch into per-sample losses through the DeepSpeed engine
(the trainer weights them so the step's loss is the mean over the usable samples of the global batch), keeps
any state of its own for checkpoints, and prepares the module for export. Every rank makes the same module
calls each step (ZeRO-3 needs it). Every random draw comes from one seed per sample (`seeds`): the DiT's noise
level and noise, the VAE's posterior noise. None depends on how the batch is split over ranks, and each is drawn
on the CPU and moved to the batch's device, so a seed gives the same draw on any device.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vidiff.config import RunConfig
from vidiff.data.pipeline import ShardLoader, to_model_input, to_uint8
from vidiff.diffusion.cascade import generate
from vidiff.diffusion.conditions import cond_channels, training_condition
from vidiff.diffusion.edm import Precond, edm_loss, sample_noise
from vidiff.eval.metrics import psnr, ssim
from vidiff.models.dit import DiT, training_flops_per_token
from vidiff.models.text import TextEncoder
from vidiff.models.vae import BlockPCA, VideoVAE, block_pca, kl_divergence, latent_shape
from vidiff.train import checkpoint


PREVIEW_PROMPTS = 4


class Objective(Protocol):
    def build_model(self) -> nn.Module: ...
    def loss(self, engine, batch: dict, seeds: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Per-sample losses (B,), the samples' noise levels (B,) where there are any (train/loss_by_sigma), and
        scalars to log."""
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def before_export(self, module: nn.Module, state: dict) -> None: ...
    def evaluate(self, engine, batches: list[dict]) -> tuple[dict[str, float], np.ndarray | None]: ...
    def preview(self, engine) -> np.ndarray | None:
        """A sampled clip per preview prompt, side by side, uint8 (T, H, W x prompts, 3) (every rank calls)."""


def per_sample_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i drawn on the CPU from seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


class VAEObjective:
    """L1 + MSE reconstruction plus a small KL term; tracks latent statistics for the exported scale."""

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu", fresh: bool = True,
                 ema_decay: float = 0.99):
        """fresh: the run starts from scratch (a resumed one loads its weights, PCA path included)."""
        self.cfg, self.device = cfg, torch.device(device)
        self.ema_decay = ema_decay
        self.latent_moments: torch.Tensor | None = None     # (2, z): EMA of per-channel E[mu], E[mu^2]
        # Read here, before the trainer builds the model (under zero.Init).
        self.pca = self._initial_pca() if fresh else None

    def build_model(self) -> nn.Module:
        return VideoVAE(self.cfg.vae, self.pca)

    def _initial_pca(self) -> BlockPCA | None:
        """The PCA of the first vae.pca_init_batches training micro-batches. Every rank reads the same batches from
        its own loader, so all compute the same PCA, and the training loader's position is untouched."""
        batches = self.cfg.vae.pca_init_batches
        if not batches:
            return None
        data = self.cfg.data.model_copy(update={"num_workers": 0})
        loader = ShardLoader(data, 0, 1, self.cfg.seed, batch_size=self.cfg.parallel.micro_batch)
        return block_pca([to_model_input(b["video"]) for b in islice(loader, batches)], self.cfg.vae.latent_channels)

    def loss(self, engine, batch, seeds):
        video = batch["video"]                                              # (B, 3, T, H, W)
        noise = per_sample_noise(seeds, latent_shape(*video.shape[2:], self.cfg.vae.latent_channels), video.device)
        recon, mean, logvar = engine(video, noise=noise)
        recon, mean, logvar = recon.float(), mean.float(), logvar.float()  # bf16 runs: the loss in fp32
        l1 = (recon - video).abs().flatten(1).mean(1)                       # (B,)
        mse = (recon - video).pow(2).flatten(1).mean(1)
        kl = kl_divergence(mean, logvar).flatten(1).mean(1)
        if not batch["padding"]:                # a batch of padding says nothing about the latent statistics
            moments = torch.stack([mean.detach().mean((0, 2, 3, 4)), mean.detach().pow(2).mean((0, 2, 3, 4))])
            self.latent_moments = moments if self.latent_moments is None else (
                self.ema_decay * self.latent_moments + (1 - self.ema_decay) * moments)
        loss = l1 + mse + self.cfg.vae.kl_weight * kl
        return loss, None, {"vae/l1": l1.mean().item(), "vae/kl": kl.mean().item(),
                      "vae/psnr": psnr(recon.detach(), video).item()}

    def preview(self, engine) -> None:
        return None                         # its previews are the held-out reconstructions (evaluate)

    def state_dict(self) -> dict:
        """The latent statistics averaged over ranks (every rank must call). The EMA is linear, so restoring
        every rank to the average exports the same statistics as an uninterrupted run, at any world size."""
        if self.latent_moments is None:
            return {}
        moments = self.latent_moments.clone()
        if dist.is_initialized():
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        return {"latent_moments": moments.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "latent_moments" in state:
            self.latent_moments = torch.tensor(state["latent_moments"], dtype=torch.float32, device=self.device)

    def before_export(self, module: nn.Module, state: dict) -> None:
        """Set the latent shift/scale from the ranks' averaged statistics (state_dict()), so encode() gives
        ~N(0, 1); with no statistics yet the module keeps its own."""
        if "latent_moments" not in state:
            return
        shift, second = torch.tensor(state["latent_moments"], dtype=torch.float32)
        module.latent_shift.copy_(shift)
        module.latent_scale.copy_((second - shift.pow(2)).clamp(min=1e-8).sqrt())

    @torch.no_grad()
    def evaluate(self, engine, batches):
        """Held-out PSNR/SSIM of reconstructions from the posterior mean; preview: input | reconstruction."""
        scores, preview = [], None
        for batch in batches:
            video = batch["video"]
            recon = engine(video)[0].float()                               # from the posterior mean
            scores.append((psnr(recon, video).item(), ssim(recon, video).item()))
            if preview is None:
                preview = np.concatenate([to_uint8(video[0]), to_uint8(recon[0])], axis=2)   # (T, H, 2W, 3)
        return {"eval/psnr": float(np.mean([p for p, _ in scores])),
                "eval/ssim": float(np.mean([s for _, s in scores]))}, preview


def build_denoiser(cfg: RunConfig, latent_channels: int, text_dim: int) -> nn.Module:
    """The trained network of a DiT run: the EDM-preconditioned DiT, with its cascade stage's condition channels."""
    net = DiT(cfg.model, latent_channels, text_dim, activation_checkpointing=cfg.parallel.activation_checkpointing,
              cond_channels=cond_channels(cfg, latent_channels))
    return Precond(net, cfg.edm.sigma_data)


def load_denoiser(run_dir: str | Path, device: torch.device | str = "cpu"
                  ) -> tuple[RunConfig, nn.Module, TextEncoder, VideoVAE]:
    """A finished DiT run's config, its denoiser (EMA weights where kept), text encoder and VAE, for sampling."""
    run_cfg, weights = checkpoint.load_export(run_dir, prefer_ema=True)
    if run_cfg.task != "dit":
        raise checkpoint.CheckpointError(f"{run_dir} is a {run_cfg.task!r} run; sampling needs a DiT run")
    vae = checkpoint.load_vae(run_cfg.vae.checkpoint).to(device)
    text = TextEncoder(run_cfg.text).to(device)
    model = build_denoiser(run_cfg, vae.cfg.latent_channels, text.dim)
    model.load_state_dict(weights)
    return run_cfg, model.to(device).eval().requires_grad_(False), text, vae


class DiTObjective:
    """EDM loss on latents of the frozen VAE, conditioned on text (the loader drops captions for guidance). The
    frozen VAE and text encoder run on the training device."""

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.text = TextEncoder(cfg.text).to(self.device)
        self.vae = checkpoint.load_vae(cfg.vae.checkpoint).to(self.device)

    def build_model(self) -> nn.Module:
        model = build_denoiser(self.cfg, self.vae.cfg.latent_channels, self.text.dim)
        if self.cfg.parallel.compile:
            model.net.compile_blocks()
        return model

    def flops_per_token(self, grid: tuple[int, int, int]) -> float:
        """Training FLOPs per latent token of the DiT on a (T', H', W') token grid (perf/mfu)."""
        z = self.vae.cfg.latent_channels
        return training_flops_per_token(self.cfg.model, grid, self.cfg.text.max_tokens, z, self.text.dim,
                                        cond_channels(self.cfg, z))

    def _text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings: cached in latent shards where present; a dropped (empty) caption has no valid
        token, so the DiT's learned null embedding stands in for it."""
        if "text" not in batch:
            return self.text(batch["caption"])
        text, mask = batch["text"].clone(), batch["text_mask"].clone()
        dropped = torch.tensor([not c for c in batch["caption"]], device=text.device)
        text[dropped], mask[dropped] = 0.0, False
        return text, mask

    def diffusion_inputs(self, batch: dict, seeds: list[int]) -> dict:
        """x0 (B, z, T', h, w), sigma (B,), noise like x0, text (B, L, Dt), text_mask (B, L), and cond: the
        stage's condition inputs ({} for a plain base stage; diffusion/conditions.py)."""
        text, text_mask = self._text(batch)
        # Latent shards (vidiff cache-latents) skip the VAE; raw clips are encoded here.
        video = batch.get("video")
        x0 = batch["latent"] if "latent" in batch else self.vae.encode(video)   # (B, z, T', h, w)
        sigma, noise = sample_noise(x0, seeds, self.cfg.edm.P_mean, self.cfg.edm.P_std)
        device = x0.device
        return {"x0": x0, "sigma": sigma, "noise": noise, "text": text.to(device), "text_mask": text_mask.to(device),
                "cond": training_condition(self.cfg, self.vae, x0, video, seeds)}

    def loss(self, engine, batch, seeds):
        d = self.diffusion_inputs(batch, seeds)
        loss = edm_loss(engine, d["x0"], d["sigma"], d["noise"], self.cfg.edm.sigma_data, text=d["text"],
                        text_mask=d["text_mask"], **d["cond"])
        return loss, d["sigma"], {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, engine, batches):
        """eval/loss_at_sigma/<s>: the weighted EDM loss of the held-out batches at each train.eval_sigmas level,
        with noise fixed by each clip's position (the same draws at every evaluation), captions kept."""
        totals = dict.fromkeys(self.cfg.train.eval_sigmas, 0.0)
        count = 0
        for b, batch in enumerate(batches):
            d = self.diffusion_inputs(batch, [self.cfg.seed + 10_000 * b + i for i in range(len(batch["caption"]))])
            for s in totals:
                sigma = torch.full_like(d["sigma"], s)
                loss = edm_loss(engine, d["x0"], sigma, d["noise"], self.cfg.edm.sigma_data, text=d["text"],
                                text_mask=d["text_mask"], **d["cond"])
                totals[s] += float(loss.sum())
            count += len(d["sigma"])
        return {f"eval/loss_at_sigma/{s:g}": total / count for s, total in totals.items()}, None

    @torch.no_grad()
    def preview(self, engine) -> np.ndarray:
        """train.preview_every: the first PREVIEW_PROMPTS sample.prompts, sampled with train.preview_steps Heun
        steps from sample.seed at the first video bucket's size, through the engine (every rank runs the same
        draws: ZeRO-3 gathers the weights), decoded by the frozen VAE."""
        frames, height, width = self.cfg.data.video_shape
        shape = latent_shape(frames, height, width, self.vae.cfg.latent_channels)
        sample = self.cfg.sample.model_copy(update={"steps": self.cfg.train.preview_steps})
        videos = generate(engine, self.text, self.vae.decode, self.cfg.sample.prompts[:PREVIEW_PROMPTS], shape,
                          sample, self.cfg.edm, show_progress=False, image_channels=self.cfg.takes_image)
        return np.concatenate([to_uint8(v) for v in videos], axis=2)            # (T, H, W x prompts, 3)

    def before_export(self, module: nn.Module, state: dict) -> None:
        pass


def build_objective(cfg: RunConfig, device: torch.device | str = "cpu", fresh: bool = True) -> Objective:
    """fresh: the run starts from scratch rather than from a checkpoint."""
    return VAEObjective(cfg, device, fresh) if cfg.task == "vae" else DiTObjective(cfg, device)
