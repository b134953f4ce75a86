"""Small real datasets for tests: mp4 clips and PNG images of several shapes with captions, latent shards, and a
VAE run folder for DiT runs on latents."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from vidiff.config import RunConfig, VAEConfig, save_config
from vidiff.data.latents import npy_bytes
from vidiff.data.shards import write_shards
from vidiff.data.synthetic import make_clips
from vidiff.data.video import encode_mp4
from vidiff.models.vae import VideoVAE, block_pca
from vidiff.train.objectives import build_denoiser


def png(height: int, width: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_samples(n_video: int = 18, n_image: int = 8) -> list[dict]:
    """Videos 9 frames 32x32, 9 frames 32x48 and 13 frames 32x32, and images 32x32 and 32x48."""
    shapes = [(9, 32, 32), (9, 32, 48), (13, 32, 32)]
    samples = []
    for i in range(n_video):
        frames, h, w = shapes[i % 3]
        (clip, video), = make_clips(1, h, w, frames, seed=i)
        samples.append({"__key__": f"v{i:05d}", "mp4": encode_mp4(video, 8), "txt": clip.caption,
                        "json": {"frames": frames, "fps": 8, "width": w, "height": h}})
    for i in range(n_image):
        h, w = (32, 32) if i % 2 else (32, 48)
        samples.append({"__key__": f"i{i:05d}", "png": png(h, w, i), "txt": f"noise image {i}",
                        "json": {"frames": 1, "fps": 0, "width": w, "height": h}})
    return samples


def write_mixed(folder: Path, max_count: int = 5, **kw) -> Path:
    """Shards of mixed_samples, shuffled across shards; returns the shard folder."""
    samples = mixed_samples(**kw)
    order = np.random.default_rng(0).permutation(len(samples))
    return write_shards([samples[i] for i in order], folder, max_count=max_count).parent


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A plain tar with the given member names and bytes (for layouts our writer would never produce)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _export(folder: Path, cfg: RunConfig, module: torch.nn.Module) -> None:
    """A run folder as the trainer exports one: config.yaml and checkpoints/<tag>/model.safetensors."""
    tag = folder / "checkpoints/step00000001"
    tag.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tag / "model.safetensors"))
    (folder / "checkpoints/latest").write_text(tag.name)


def vae_run_folder(folder: Path, videos: list[torch.Tensor] | None = None, latent_channels: int = 4) -> None:
    """A VAE run folder: untrained (the DiT here reads latent shards), or with videos ((B, 3, T, H, W) in [-1, 1])
    its linear path the PCA of their blocks, so it reconstructs clips like them."""
    cfg = RunConfig(task="vae", out_dir=str(folder),
                    vae=VAEConfig(latent_channels=latent_channels, base_channels=max(8, latent_channels)))
    pca = block_pca(videos, cfg.vae.latent_channels) if videos else None
    _export(folder, cfg, VideoVAE(cfg.vae, pca))


def dit_run_folder(folder: Path, vae: Path, stage: str, buckets: list[tuple[int, int, int]], seed: int = 0,
                   **cascade) -> RunConfig:
    """An untrained tiny DiT run of a cascade stage, from open gates (every output depends on every input), as
    the trainer exports one."""
    cfg = RunConfig(out_dir=str(folder), stage=stage, seed=seed, vae={"checkpoint": str(vae)},
                    data={"buckets": buckets}, text={"max_tokens": 8}, edm={"sigma_data": 1.0}, cascade=cascade,
                    model={"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": (1, 1, 1),
                           "zero_init": False})
    torch.manual_seed(seed)
    _export(folder, cfg, build_denoiser(cfg, 4, 384))
    return cfg


def latent_samples(n: int, shapes=((9, 32, 32),)) -> Iterator[dict]:
    """Latent shard samples with cached token embeddings (MiniLM width), a fifth of them with a dropped caption;
    sample i is cached at shapes[i % len(shapes)] (frames, height, width)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        frames, height, width = shapes[i % len(shapes)]
        mask = np.arange(8) < rng.integers(1, 8)
        dropped = i % 5 == 0
        latent = rng.standard_normal((4, 1 + (frames - 1) // 4, height // 8, width // 8)).astype(np.float16)
        yield {"__key__": f"s{i:04d}", "txt": "" if dropped else f"caption {i}",
               "latent.npy": npy_bytes(latent),
               "text.npy": npy_bytes(rng.standard_normal((8, 384)).astype(np.float16)),
               "mask.npy": npy_bytes(mask & (not dropped)),
               "json": {"frames": frames, "height": height, "width": width, "fps": 8}}
