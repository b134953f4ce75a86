"""PyAV video I/O: probe, decode a clip from bytes (stride, resize in swscale), encode mp4 and GIF."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


class ClipError(ValueError):
    """A clip that cannot be used: undecodable, or shorter than requested. `reason` names the kind."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    duration: float


def _open(source: bytes | str | Path) -> av.container.InputContainer:
    return av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))


def probe(source: bytes | str | Path) -> VideoInfo:
    """Frame count, fps, size and duration; counts frames by demuxing when the header has no count."""
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            duration = frames / fps if fps else 0.0
            return VideoInfo(frames, fps, stream.codec_context.width, stream.codec_context.height, duration)
    except (av.FFmpegError, IndexError) as exc:
        raise ClipError("undecodable", f"cannot probe: {exc}") from None


def decode_clip(source: bytes | str | Path, num_frames: int, height: int, width: int,
                stride: int = 1, threads: int = 1) -> np.ndarray:
    """The first num_frames frames taken every `stride`, resized in swscale -> uint8 (T, H, W, 3)."""
    frames: list[np.ndarray] = []
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            stream.thread_count = threads          # bounded: N loader workers x all cores oversubscribes
            for i, frame in enumerate(container.decode(stream)):
                if i % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                    if len(frames) == num_frames:
                        break
    except (av.FFmpegError, IndexError) as exc:
        raise ClipError("undecodable", str(exc)) from None
    if len(frames) < num_frames:
        raise ClipError("too_short", f"{len(frames)} frames at stride {stride}, need {num_frames}")
    return np.stack(frames)                     # (T, H, W, 3)


def _codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames: np.ndarray, fps: int, path: str | Path | None = None) -> bytes:
    """uint8 (T, H, W, 3) -> H.264 mp4 bytes (mpeg4 where the build lacks libx264); also written to path."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(_codec(), rate=Fraction(fps))
        stream.width, stream.height = W + W % 2, H + H % 2      # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if W % 2 or H % 2:
                frame = np.pad(frame, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def encode_gif(frames: np.ndarray, fps: int) -> bytes:
    """uint8 (T, H, W, 3) -> animated GIF bytes (TensorBoard previews; its add_video needs moviepy 1)."""
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    return buffer.getvalue()


def contact_sheet(clips: list[np.ndarray], path: str | Path) -> None:
    """One row per clip, one column per frame, written as PNG."""
    rows = [np.concatenate(list(clip), axis=1) for clip in clips]       # each (H, T*W, 3)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
