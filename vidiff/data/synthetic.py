"""Captioned moving-shapes clips with known ground truth ("a red square moving left")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
BACKGROUND = (24, 24, 32)


@dataclass(frozen=True)
class ShapeClip:
    color: str
    shape: str
    direction: str
    start: tuple[int, int]      # (row, col) of the shape's centre in frame 0
    speed: int                  # pixels per frame

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


def _radius(height: int, width: int) -> int:
    return max(2, min(height, width) // 6)


def random_clip(rng: np.random.Generator, height: int, width: int, frames: int) -> ShapeClip:
    direction = str(rng.choice(list(DIRECTIONS)))
    r = _radius(height, width)
    # Over the clip the shape crosses about three quarters of the free space.
    speed = max(1, round(0.75 * (min(height, width) - 2 * r) / max(1, frames - 1)))
    travel = speed * (frames - 1)
    dy, dx = DIRECTIONS[direction]
    # Start so the whole path stays inside the frame.
    row_lo, row_hi = r - min(0, dy) * travel, height - r - max(0, dy) * travel
    col_lo, col_hi = r - min(0, dx) * travel, width - r - max(0, dx) * travel
    start = (int(rng.integers(row_lo, max(row_lo + 1, row_hi))), int(rng.integers(col_lo, max(col_lo + 1, col_hi))))
    return ShapeClip(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), direction, start, speed)


def render(clip: ShapeClip, height: int, width: int, frames: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of one shape moving in a straight line on a dark background."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    rows, cols = np.mgrid[0:height, 0:width]
    r = _radius(height, width)
    dy, dx = DIRECTIONS[clip.direction]
    for t in range(frames):
        cy, cx = clip.start[0] + dy * clip.speed * t, clip.start[1] + dx * clip.speed * t
        if clip.shape == "square":
            mask = (abs(rows - cy) <= r) & (abs(cols - cx) <= r)
        else:
            mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
        video[t][mask] = COLORS[clip.color]
    return video


def make_clips(n: int, height: int, width: int, frames: int, seed: int = 0):
    """Yield n (ShapeClip, frames) pairs, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        clip = random_clip(rng, height, width, frames)
        yield clip, render(clip, height, width, frames)
