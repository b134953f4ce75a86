"""Ground-truth checker for a generated moving-shapes clip and its prompt ("a red square moving left").

Per frame, every pixel within COLOR_DELTA_E (CIE76 distance in CIELAB, a perceptual space) of a palette colour,
and nearest to it, belongs to that colour; 8-connected regions of at least `min_area` pixels are objects. The
clip passes when, in every frame:
  count      exactly the prompted objects are there: one region per prompted colour, none of another colour;
  shape      over the clip: a triangle (pointing up) has its centroid 2/3 of the way down its bounding box,
             a square and a circle 1/2; between those two, the better mean intersection over union with each
             drawn into the region's box;
  motion     its centroid heads the prompted way, may turn back once only at the border it reached (a
             bounce), and drifts little across that axis;
  coherence  its area and mean colour stay steady across frames.
Sub-scores are in [0, 1] (count, motion and coherence: the share of frames or frame steps that hold; shape: 1 or
0); `passed` needs all four to be 1. Objects need a radius of about 8 pixels (frames of 48 pixels or more): smaller
ones lose their shape to the mp4's chroma subsampling.
Against a true clip of the same prompt (a super-resolution stage's output, say), `track_error` measures how far the
objects are from where the true clip has them, frame by frame: the motion a prompt cannot judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from vidiff.data.synthetic import BACKGROUND, COLORS, DIRECTIONS, SHAPES, radius_for

COLOR_DELTA_E = 40.0          # CIE76 radius of a palette colour (palette colours are >= 70 apart)
TRIANGLE_DEPTH = 7 / 12       # mean centroid depth in the box above which a shape is a triangle (1/2 vs 2/3)
STEP_TOLERANCE = 1.0          # pixels a centroid may step back against its heading (raster and noise)
MAX_AREA_RATIO = 1.6          # largest over smallest area across frames
MAX_COLOR_DRIFT = 15.0        # CIE76 distance of a frame's mean object colour from the clip's median
SUB_SCORES = ("count", "shape", "motion", "coherence")


@dataclass(frozen=True)
class Phrase:
    color: str
    shape: str
    direction: str


@dataclass
class CheckResult:
    passed: bool
    scores: dict[str, float]                        # each in [0, 1]
    reasons: list[str] = field(default_factory=list)


def parse_prompt(prompt: str) -> list[Phrase]:
    """One Phrase per "<colour> <shape> ... <direction>" part of the prompt, parts joined by "and"."""
    phrases = []
    for part in re.split(r"\band\b", prompt.lower()):
        words = re.findall(r"[a-z]+", part)
        found = [[w for w in words if w in vocab] for vocab in (COLORS, SHAPES, DIRECTIONS)]
        if any(len(f) != 1 for f in found):
            raise ValueError(f"prompt part {part.strip()!r} of {prompt!r} needs one colour ({', '.join(COLORS)}), "
                             f"one shape ({', '.join(SHAPES)}) and one direction ({', '.join(DIRECTIONS)})")
        phrases.append(Phrase(*(f[0] for f in found)))
    return phrases


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 or [0, 255] sRGB (..., 3) -> CIELAB (..., 3), D65 white."""
    c = np.asarray(rgb, np.float32) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]],
                            np.float32)
    xyz = xyz / np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


PALETTE_LAB = srgb_to_lab(np.array(list(COLORS.values()), np.float32))          # (K, 3)


@dataclass(frozen=True)
class Region:
    area: int
    centroid: tuple[float, float]           # (row, col)
    box: tuple[int, int, int, int]          # top, bottom, left, right (inclusive)
    fit: dict[str, float]                   # IoU with a square and a circle drawn into its bounding box
    depth: float                            # the centroid's depth in the box: 0 top, 1 bottom
    lab: tuple[float, float, float]         # mean colour


def shape_templates(height: int, width: int) -> dict[str, np.ndarray]:
    """A square and a circle drawn to fill a (height, width) box: the square fills it, the circle touches its
    sides."""
    rows = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height            # (h, 1) in (0, 1)
    cols = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width              # (1, w)
    return {"circle": (rows - 0.5) ** 2 + (cols - 0.5) ** 2 <= 0.25, "square": np.ones((height, width), bool)}


def clip_shape(track: list[Region]) -> str:
    """One shape for an object's regions over a clip: a triangle pointing up has its centroid 2/3 down its box
    (square and circle: 1/2), and blur rounds its corners without moving that much; otherwise the better fit of
    square and circle, averaged over frames."""
    if np.mean([reg.depth for reg in track]) > TRIANGLE_DEPTH:
        return "triangle"
    fit = {name: np.mean([reg.fit[name] for reg in track]) for name in ("square", "circle")}
    return max(fit, key=fit.get)


def _regions(core: np.ndarray, alpha: np.ndarray, lab: np.ndarray, min_area: int) -> list[Region]:
    """Objects of one colour in one frame. core (H, W): pixels of that colour; alpha (H, W): each pixel's share
    of that colour over the background. An object is a core region of min_area pixels or more, grown into the
    neighbouring pixels that are at least half the colour: its half-intensity outline, which a blurred edge
    keeps where a colour threshold would erode it (and round a triangle's corners)."""
    labels, _ = ndimage.label(core, structure=np.ones((3, 3)))
    regions = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        seed = labels == i
        if seed[box].sum() < min_area:
            continue
        grown = seed | (ndimage.binary_dilation(seed, iterations=2) & (alpha >= 0.5))
        rows, cols = np.nonzero(grown)
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        region = grown[top:bottom + 1, left:right + 1]                           # (h, w) of its box
        fit = {name: float((region & t).sum() / (region | t).sum())
               for name, t in shape_templates(*region.shape).items()}
        regions.append(Region(int(region.sum()), (float(rows.mean()), float(cols.mean())),
                              (int(top), int(bottom), int(left), int(right)), fit,
                              float((rows.mean() - top) / max(1, bottom - top)),
                              tuple(float(v) for v in lab[seed].mean(0))))
    return regions


def _alpha(video: np.ndarray) -> np.ndarray:
    """(T, H, W, K): each pixel's share of palette colour k over the background, by projection in sRGB."""
    bg = np.array(BACKGROUND, np.float32)
    colors = np.array(list(COLORS.values()), np.float32) - bg                  # (K, 3)
    return (video.astype(np.float32) - bg) @ colors.T / (colors ** 2).sum(1)


def _motion(track: np.ndarray, phrase: Phrase, boxes: list[tuple[int, int, int, int]], height: int,
            width: int) -> tuple[float, list[str]]:
    """Fraction of frame steps consistent with the prompted heading (with at most one bounce), and why not."""
    dy, dx = DIRECTIONS[phrase.direction]
    axis, sign = (0, dy) if dy else (1, dx)
    pos = sign * track[:, axis]                                       # (T,) progress along the heading
    steps = np.diff(pos)
    turn = int(np.argmax(pos))
    if pos[turn] - pos[-1] <= STEP_TOLERANCE:                         # no bounce: heading all the way
        turn = len(pos) - 1
    ok = np.concatenate([steps[:turn] >= -STEP_TOLERANCE, steps[turn:] <= STEP_TOLERANCE])
    reasons = []
    size = height if axis == 0 else width
    travel = pos[turn] - pos[0]
    if travel < 0.1 * size:
        reasons.append(f"moves {travel:.1f} px {phrase.direction} before turning (needs {0.1 * size:.1f})")
        ok[:] = False
    if turn < len(pos) - 1:
        top, bottom, left, right = boxes[turn]
        gap = {"up": top, "down": height - 1 - bottom, "left": left, "right": width - 1 - right}[phrase.direction]
        if gap > np.abs(steps).max() + 1.5:
            reasons.append(f"turns back {gap} px from the {phrase.direction} border (a bounce turns at it)")
            ok[turn:] = False
    drift = np.ptp(track[:, 1 - axis])
    if drift > max(2.0, 0.1 * size):
        reasons.append(f"drifts {drift:.1f} px across its heading")
        ok[:] = False
    if not ok.all():
        reasons.append(f"heads {phrase.direction} in {int(ok.sum())} of {len(ok)} frame steps")
    return float(ok.mean()), reasons


def frame_regions(video: np.ndarray, min_area: int | None = None) -> list[dict[str, list[Region]]]:
    """uint8 frames (T, H, W, 3) -> per frame, per palette colour, that colour's objects."""
    frames, height, width = video.shape[:3]
    r = radius_for(height, width)
    min_area = min_area if min_area is not None else max(4, (r * r) // 2)
    lab = srgb_to_lab(video)                                                    # (T, H, W, 3)
    dist = np.linalg.norm(lab[..., None, :] - PALETTE_LAB, axis=-1)             # (T, H, W, K)
    nearest, near = dist.argmin(-1), dist.min(-1) < COLOR_DELTA_E
    alpha = _alpha(video)
    return [{c: _regions(near[t] & (nearest[t] == k), alpha[t, ..., k], lab[t], min_area)
             for k, c in enumerate(COLORS)} for t in range(frames)]


def track_error(video: np.ndarray, truth: np.ndarray, prompt: str, min_area: int | None = None) -> float:
    """Where the prompted objects are against where they truly are: the mean distance (pixels) between each
    prompted object's centroid in `video` and in the true clip `truth` (both uint8 (T, H, W, 3)), over frames and
    objects. A frame where `video` does not show exactly one object of that colour counts as the frame's width
    away; frames where the truth does not are left out. Unlike the motion sub-score, which asks only that an
    object heads the prompted way (a repeated frame does), this asks that it is where the true clip has it."""
    width = video.shape[2]
    ours, true = frame_regions(video, min_area), frame_regions(truth, min_area)
    errors = [float(np.hypot(*np.subtract(a[p.color][0].centroid, b[p.color][0].centroid)))
              if len(a[p.color]) == 1 else float(width)
              for p in parse_prompt(prompt) for a, b in zip(ours, true) if len(b[p.color]) == 1]
    return float(np.mean(errors)) if errors else float("nan")


def check_clip(video: np.ndarray, prompt: str, min_area: int | None = None) -> CheckResult:
    """Check uint8 frames (T, H, W, 3) against their prompt."""
    phrases = parse_prompt(prompt)
    frames, height, width = video.shape[:3]
    names = list(COLORS)
    regions = frame_regions(video, min_area)           # regions[t][colour]: that colour's objects in frame t
    wanted = {c: sum(p.color == c for p in phrases) for c in names}
    count_ok = [all(len(regions[t][c]) == wanted[c] for c in names) for t in range(frames)]
    scores = {"count": float(np.mean(count_ok))}
    reasons = []
    if not all(count_ok):
        t = count_ok.index(False)
        seen = {c: len(regions[t][c]) for c in names if regions[t][c]}
        reasons.append(f"frame {t}: objects by colour {seen or 'none'}, prompt wants "
                       f"{ {c: n for c, n in wanted.items() if n} }")
    shape_scores, motion_scores, coherence_scores = [], [], []
    for phrase in phrases:
        track = [regions[t][phrase.color][0] for t in range(frames) if len(regions[t][phrase.color]) == 1]
        if len(track) < frames:                                 # not one such object in every frame
            shape_scores.append(0.0), motion_scores.append(0.0), coherence_scores.append(0.0)
            continue
        shape = clip_shape(track)                          # one decision per clip: a frame's edge noise cannot flip it
        shape_scores.append(float(shape == phrase.shape))
        if shape != phrase.shape:
            reasons.append(f"{phrase.color} object looks like a {shape}, prompt says {phrase.shape} (centroid depth "
                           f"{np.mean([reg.depth for reg in track]):.2f}; IoU square "
                           f"{np.mean([reg.fit['square'] for reg in track]):.2f}, circle "
                           f"{np.mean([reg.fit['circle'] for reg in track]):.2f})")
        score, why = _motion(np.array([reg.centroid for reg in track]), phrase, [reg.box for reg in track],
                             height, width)
        motion_scores.append(score)
        reasons += [f"{phrase.color} object {w}" for w in why]
        areas = np.array([reg.area for reg in track])
        colors = np.array([reg.lab for reg in track])
        drift = np.linalg.norm(colors - np.median(colors, 0), axis=-1)
        steady = (areas.max() / areas.min() <= MAX_AREA_RATIO) & (drift <= MAX_COLOR_DRIFT)
        coherence_scores.append(float(steady.mean()) if np.ndim(steady) else float(steady))
        if areas.max() / areas.min() > MAX_AREA_RATIO:
            reasons.append(f"{phrase.color} object's area varies {areas.min()}..{areas.max()} px")
        if drift.max() > MAX_COLOR_DRIFT:
            reasons.append(f"{phrase.color} object's colour drifts {drift.max():.0f} (CIE76)")
    scores.update(shape=min(shape_scores), motion=min(motion_scores), coherence=min(coherence_scores))
    return CheckResult(all(scores[k] == 1.0 for k in SUB_SCORES), scores, reasons)
