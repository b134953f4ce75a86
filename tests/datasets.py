"""Small real datasets for data tests: mp4 clips and PNG images of several shapes, with captions."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from vidiff.data.shards import write_shards
from vidiff.data.synthetic import make_clips
from vidiff.data.video import encode_mp4


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
