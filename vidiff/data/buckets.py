"""(frames, height, width) buckets: each sample goes to the bucket that fits it best, and each bucket's
batch size is chosen so that every batch holds about the same number of latent tokens.

Images are the 1-frame buckets; a video goes to a bucket only if it has the frames that bucket needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vidiff.config import DataConfig

SPATIAL_FACTOR, TEMPORAL_FACTOR = 8, 4      # the VAE's compression (models/vae.py)


def token_grid(frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 1, 1)
               ) -> tuple[int, int, int]:
    """The DiT's token grid (T', H', W') of a (frames, height, width) clip: the VAE's latent, patchified."""
    pt, ph, pw = patch
    return ((1 + (frames - 1) // TEMPORAL_FACTOR) // pt, height // SPATIAL_FACTOR // ph, width // SPATIAL_FACTOR // pw)


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int

    @property
    def is_image(self) -> bool:
        return self.frames == 1

    @property
    def latent_tokens(self) -> int:
        return math.prod(token_grid(self.frames, self.height, self.width))

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def make_buckets(cfg: DataConfig, batch_size: int) -> list[Bucket]:
    """Buckets from the config; the first bucket takes batch_size (the micro-batch), the others match its
    token count."""
    shapes = cfg.buckets
    first = Bucket(*shapes[0], batch_size=batch_size)
    budget = first.latent_tokens * batch_size
    buckets = [first]
    for frames, height, width in shapes[1:]:
        probe = Bucket(frames, height, width, 1)
        buckets.append(Bucket(frames, height, width, max(1, round(budget / probe.latent_tokens))))
    return buckets


def frames_needed(bucket: Bucket, stride: int) -> int:
    """Source frames a clip must have to fill the bucket at this stride."""
    return (bucket.frames - 1) * stride + 1


def assign_bucket(buckets: list[Bucket], is_image: bool, width: int, height: int,
                  frames: int, stride: int) -> Bucket | None:
    """The bucket with the nearest aspect ratio among those the sample can fill (ties: more frames);
    None when no bucket fits (a clip shorter than every video bucket)."""
    if is_image:
        candidates = [b for b in buckets if b.is_image]
    else:
        candidates = [b for b in buckets if not b.is_image and frames_needed(b, stride) <= frames]
    if not candidates:
        return None
    aspect = math.log(max(width, 1) / max(height, 1))
    return min(candidates, key=lambda b: (abs(math.log(b.width / b.height) - aspect), -b.frames))
