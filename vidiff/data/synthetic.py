"""Captioned moving-shapes clips with known ground truth ("a red square moving left").

Every clip is a few coloured shapes (circle, square, triangle) sliding left, right, up or down and bouncing off
the frame's borders, on a dark background that harder sets texture. The truth of each clip (colours, shapes,
directions, start, speed) travels with it, so `vidiff.eval.shapes` can check a generated clip against its
prompt exactly. Splits: `train` and `heldout` draw from separate random streams of one seed, and the held-out
set also covers UNSEEN_COMBOS, (colour, shape, direction) triples that training never shows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Iterator, Literal

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
BACKGROUND = (24, 24, 32)
TEMPLATES = ("a {color} {shape} moving {direction}", "a {color} {shape} moves {direction}",
             "a {color} {shape} going {direction}", "a {color} {shape} sliding {direction}")
# Held out of training for compositional generalization: every colour, shape and direction still trains.
UNSEEN_COMBOS = frozenset({
    ("red", "triangle", "up"), ("green", "circle", "left"), ("blue", "square", "down"),
    ("yellow", "triangle", "right"), ("red", "circle", "down"), ("blue", "triangle", "left"),
})
ALL_COMBOS = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS))
SEEN_COMBOS = tuple(c for c in ALL_COMBOS if c not in UNSEEN_COMBOS)
Split = Literal["train", "heldout"]
_STREAMS = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    direction: str
    start: tuple[float, float]  # (row, col) of the shape's centre in frame 0
    speed: float                # pixels per frame along the direction
    radius: int                 # half the side of the shape's bounding box, less one

    @property
    def combo(self) -> tuple[str, str, str]:
        return self.color, self.shape, self.direction

    def centre(self, t: int, height: int, width: int) -> tuple[float, float]:
        """(row, col) in frame t: a straight line folded back at the borders (a bounce)."""
        dy, dx = DIRECTIONS[self.direction]
        r = self.radius
        return (_bounce(self.start[0] + dy * self.speed * t, r, height - 1 - r),
                _bounce(self.start[1] + dx * self.speed * t, r, width - 1 - r))

    def mask(self, t: int, height: int, width: int) -> np.ndarray:
        cy, cx = self.centre(t, height, width)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        r = self.radius
        if self.shape == "square":
            return (abs(rows - cy) <= r + 0.5) & (abs(cols - cx) <= r + 0.5)
        if self.shape == "circle":
            return (rows - cy) ** 2 + (cols - cx) ** 2 <= (r + 0.5) ** 2
        # Triangle pointing up: apex at the top of the box, base along its bottom (half the box filled).
        depth = rows - (cy - r - 0.5)
        return (depth >= 0) & (depth <= 2 * r + 1) & (abs(cols - cx) <= depth / 2)


@dataclass(frozen=True)
class ShapeClip:
    objects: tuple[ShapeObject, ...]
    template: int = 0           # index into TEMPLATES
    texture: int = -1           # background texture seed; -1: plain background

    @property
    def caption(self) -> str:
        return " and ".join(TEMPLATES[self.template].format(color=o.color, shape=o.shape, direction=o.direction)
                            for o in self.objects)

    @property
    def unseen(self) -> bool:
        """Whether any object is a (colour, shape, direction) that training never shows."""
        return any(o.combo in UNSEEN_COMBOS for o in self.objects)


def _bounce(x: float, lo: float, hi: float) -> float:
    """x folded into [lo, hi] as a ball bouncing between two walls."""
    span = hi - lo
    y = (x - lo) % (2 * span)
    return lo + (2 * span - y if y > span else y)


def radius_for(height: int, width: int) -> int:
    return max(2, min(height, width) // 6)


def random_object(rng: np.random.Generator, height: int, width: int, frames: int,
                  combo: tuple[str, str, str]) -> ShapeObject:
    color, shape, direction = combo
    r = radius_for(height, width)
    # Over the clip the shape travels about 60% of its free span: at most one bounce.
    span = min(height, width) - 1 - 2 * r
    speed = max(1.0, 0.6 * span / max(1, frames - 1))
    # It heads the prompted way for at least the first half of the clip before any bounce.
    ahead = speed * (frames - 1) / 2
    dy, dx = DIRECTIONS[direction]
    start = tuple(float(rng.uniform(r + max(0, -d) * ahead, size - 1 - r - max(0, d) * ahead))
                  for d, size in ((dy, height), (dx, width)))
    return ShapeObject(color, shape, direction, start, speed, r)


def random_clip(rng: np.random.Generator, height: int, width: int, frames: int, split: Split = "train",
                second_object: float = 0.0, texture: float = 0.0,
                combo: tuple[str, str, str] | None = None) -> ShapeClip:
    """One clip; training draws only SEEN_COMBOS. With probability second_object a second object (never the
    first's colour or shape) is tried, and kept when a path that stays clear of the first is found (at 48x48
    about 6 times in 10); with probability texture the background is textured."""
    pool = SEEN_COMBOS if split == "train" else ALL_COMBOS
    combo = combo or pool[int(rng.integers(len(pool)))]
    objects = [random_object(rng, height, width, frames, combo)]
    if rng.random() < second_object:
        # Another colour and shape, on a path that never touches the first's (redrawn until it does not):
        # each object stays whole and countable in every frame.
        others = [c for c in pool if c[0] != combo[0] and c[1] != combo[1]]
        for _ in range(100):
            other = random_object(rng, height, width, frames, others[int(rng.integers(len(others)))])
            if not _touch(objects[0], other, height, width, frames):
                objects.append(other)
                break
    textured = rng.random() < texture
    return ShapeClip(tuple(objects), int(rng.integers(len(TEMPLATES))),
                     int(rng.integers(2**31)) if textured else -1)


def _touch(a: ShapeObject, b: ShapeObject, height: int, width: int, frames: int, gap: int = 3) -> bool:
    """Whether two objects' bounding boxes come within gap pixels of each other in any frame."""
    reach = a.radius + b.radius + 1 + gap
    for t in range(frames):
        (ay, ax), (by, bx) = a.centre(t, height, width), b.centre(t, height, width)
        if abs(ay - by) < reach and abs(ax - bx) < reach:
            return True
    return False


def _background(clip: ShapeClip, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float background: plain, or low-contrast diagonal stripes and blotches (dark, so no object
    colour is near it)."""
    base = np.broadcast_to(np.array(BACKGROUND, np.float32), (height, width, 3)).copy()
    if clip.texture < 0:
        return base
    rng = np.random.default_rng(clip.texture)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period, phase = rng.uniform(0, np.pi), rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (rows * np.sin(angle) + cols * np.cos(angle)) / period + phase)
    blotches = rng.normal(0, 1, (height // 8 + 1, width // 8 + 1)).repeat(8, 0).repeat(8, 1)[:height, :width]
    return base + (10 * stripes + 6 * blotches)[..., None]


def render(clip: ShapeClip, height: int, width: int, frames: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of the clip's objects, drawn in order over its background."""
    background = _background(clip, height, width)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        frame = background.copy()
        for obj in clip.objects:
            frame[obj.mask(t, height, width)] = COLORS[obj.color]
        video[t] = np.clip(np.rint(frame), 0, 255)
    return video


def make_clips(n: int, height: int, width: int, frames: int, seed: int = 0, split: Split = "train",
               second_object: float = 0.0, texture: float = 0.0) -> Iterator[tuple[ShapeClip, np.ndarray]]:
    """Yield n (ShapeClip, frames) pairs, reproducible from (seed, split)."""
    rng = np.random.default_rng([seed, _STREAMS[split]])
    for _ in range(n):
        clip = random_clip(rng, height, width, frames, split, second_object, texture)
        yield clip, render(clip, height, width, frames)


def combo_clips(height: int, width: int, frames: int, combos, per_combo: int = 1, seed: int = 0,
                split: Split = "heldout") -> list[tuple[ShapeClip, np.ndarray]]:
    """per_combo clips of each (colour, shape, direction), from the split's random stream, with the plain
    caption template (the prompts a user would type)."""
    rng = np.random.default_rng([seed, _STREAMS[split]])
    out = []
    for combo in combos:
        for _ in range(per_combo):
            clip = replace(random_clip(rng, height, width, frames, split, combo=combo), template=0)
            out.append((clip, render(clip, height, width, frames)))
    return out


def heldout_clips(height: int, width: int, frames: int, per_combo: int = 1, seed: int = 0
                  ) -> list[tuple[ShapeClip, np.ndarray]]:
    """per_combo held-out clips of every (colour, shape, direction), seen and unseen."""
    return combo_clips(height, width, frames, ALL_COMBOS, per_combo, seed, "heldout")


# Corruptions that the checker must reject (its validation, tests/test_shapes.py).
CORRUPTIONS = ("shuffled", "wrong_color", "wrong_shape", "reversed", "second_object")


def corrupt(clip: ShapeClip, video: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames of the clip corrupted one way, to be checked against the clip's (unchanged) caption."""
    height, width, frames = video.shape[1], video.shape[2], video.shape[0]
    first = clip.objects[0]
    if kind == "shuffled":                       # no frame stays where it was
        order = np.arange(frames)
        while np.any(order == np.arange(frames)):
            order = rng.permutation(frames)
        return video[order]
    if kind == "wrong_color":
        wrong = replace(first, color=str(rng.choice([c for c in COLORS if c != first.color])))
    elif kind == "wrong_shape":
        wrong = replace(first, shape=str(rng.choice([s for s in SHAPES if s != first.shape])))
    elif kind == "reversed":                     # heads the other way (for at least half the clip)
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
        wrong = random_object(rng, height, width, frames, (first.color, first.shape, opposite[first.direction]))
    elif kind == "second_object":
        combo = (str(rng.choice([c for c in COLORS if c != first.color])), str(rng.choice(SHAPES)),
                 str(rng.choice(list(DIRECTIONS))))
        extra = random_object(rng, height, width, frames, combo)
        return render(replace(clip, objects=(*clip.objects, extra)), height, width, frames)
    else:
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    return render(replace(clip, objects=(wrong, *clip.objects[1:])), height, width, frames)
