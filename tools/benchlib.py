"""Shared by tools/bench_memory.py and tools/bench_train.py: the EDM-preconditioned DiT of a size preset,
trained through the same sharded-layout engine as `vidiff train` (zero.Init, ZeRO-3, our DeepSpeed config) on
random 16-channel latents and 384-wide text tokens (the shapes of our VAE and MiniLM)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from vidiff.config import DiTConfig, EDMConfig, ParallelConfig, RunConfig, TrainConfig
from vidiff.diffusion.edm import edm_loss, sample_noise
from vidiff.parallel.deepspeed import deepspeed_config
from vidiff.parallel.layout import make_layout
from vidiff.parallel.sharded import build_sharded_engine
from vidiff.train.objectives import build_denoiser
from vidiff.train.trainer import init_distributed, make_optimizer, seed_everything

REPO = Path(__file__).resolve().parents[1]
LATENT_CHANNELS, TEXT_DIM, TEXT_TOKENS = 16, 384, 32


def run_config(preset: str, precision: str, micro_batch: int, checkpointing: bool = False) -> RunConfig:
    # vae.checkpoint is only read by the DiT objective, which the benchmarks do not build.
    return RunConfig(task="dit", vae={"checkpoint": "unused"}, model=DiTConfig(preset=preset),
                     edm=EDMConfig(sigma_data=1.0), train=TrainConfig(lr=1e-4),
                     parallel=ParallelConfig(micro_batch=micro_batch, precision=precision,
                                             activation_checkpointing=checkpointing))


def build_engine(cfg: RunConfig):
    """(engine, rank, world) in the sharded layout on the launcher's ranks."""
    rank, world = init_distributed()
    seed_everything(0)
    layout = make_layout(cfg, world)
    engine, _ = build_sharded_engine(cfg, layout, lambda: build_denoiser(cfg, LATENT_CHANNELS, TEXT_DIM),
                                     deepspeed_config(cfg, layout), make_optimizer)
    return engine, rank, world


def batch(cfg: RunConfig, latent: tuple[int, int, int], device, step: int = 0) -> dict[str, torch.Tensor]:
    """Random latents (B, 16, T', H', W'), EDM draws and text tokens for one micro-batch."""
    B = cfg.parallel.micro_batch
    g = torch.Generator().manual_seed(step)
    x0 = torch.randn(B, LATENT_CHANNELS, *latent, generator=g).to(device)
    sigma, noise = sample_noise(x0, [step * 1000 + i for i in range(B)], cfg.edm.P_mean, cfg.edm.P_std)
    text = torch.randn(B, TEXT_TOKENS, TEXT_DIM, generator=g).to(device)
    return {"x0": x0, "sigma": sigma, "noise": noise, "text": text,
            "text_mask": torch.ones(B, TEXT_TOKENS, dtype=torch.bool, device=device)}


def forward_backward(engine, cfg: RunConfig, d: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = edm_loss(engine, d["x0"], d["sigma"], d["noise"], cfg.edm.sigma_data, text=d["text"],
                    text_mask=d["text_mask"]).mean()
    engine.backward(loss)
    return loss


def parse_with_worker(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The benchmark's arguments plus the ones its ranks get: --worker, --out (rank 0's result file) and the
    launcher's --local_rank."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def launch(script: str, ranks: int, args: list[str], timeout: float = 1800) -> None:
    """Run `script --worker ARGS` on `ranks` processes through the deepspeed launcher (CPU ranks with gloo
    when there is no GPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    port = str(29500 + (os.getpid() + ranks) % 1000)
    deepspeed = Path(sys.executable).with_name("deepspeed")
    result = subprocess.run([str(deepspeed), "--num_gpus", str(ranks), "--master_port", port, script, "--worker",
                             *args], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        sys.exit(f"{script} on {ranks} ranks failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
