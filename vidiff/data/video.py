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


def cover_size(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int]:
    """The smallest aspect-preserving size that covers (dst_w, dst_h); a center crop then gives dst exactly."""
    scale = max(dst_w / src_w, dst_h / src_h)
    return max(dst_w, round(src_w * scale)), max(dst_h, round(src_h * scale))


def center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (frame.shape[0] - height) // 2, (frame.shape[1] - width) // 2
    return frame[top:top + height, left:left + width]


def decode_clip(source: bytes | str | Path, num_frames: int, height: int, width: int,
                stride: int = 1, start: int = 0, threads: int = 1) -> np.ndarray:
    """Frames start, start + stride, ... (num_frames of them), resized in swscale to cover (height, width)
    and center-cropped -> uint8 (T, H, W, 3). Seeks to the keyframe before `start` instead of decoding from 0."""
    frames: list[np.ndarray] = []
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            stream.thread_count = threads          # bounded: N loader workers x all cores oversubscribes
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if start > 0 and fps > 0 and stream.time_base:
                # seek() takes stream.time_base units and lands on the preceding keyframe.
                container.seek(int(start / fps / stream.time_base), stream=stream, backward=True)
            size = None
            for frame in container.decode(stream):
                index = round(float(frame.time) * fps) if (frame.time is not None and fps) else len(frames)
                if index < start or (index - start) % stride:
                    continue
                if size is None:
                    size = cover_size(frame.width, frame.height, width, height)
                rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                frames.append(center_crop(rgb, height, width))
                if len(frames) == num_frames:
                    break
    except (av.FFmpegError, IndexError, ValueError) as exc:
        raise ClipError("undecodable", str(exc)) from None
    if len(frames) < num_frames:
        raise ClipError("too_short", f"{len(frames)} frames from frame {start} at stride {stride}, need {num_frames}")
    return np.stack(frames)                     # (T, H, W, 3)


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """Image bytes (JPEG, PNG, WebP, ...) -> uint8 (1, H, W, 3), resized to cover and center-cropped."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            w, h = cover_size(image.width, image.height, width, height)
            rgb = np.asarray(image.resize((w, h), Image.BICUBIC))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ClipError("undecodable_image", str(exc)) from None
    return center_crop(rgb, height, width)[None]


def probe_image(data: bytes) -> VideoInfo:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return VideoInfo(1, 0.0, image.width, image.height, 0.0)
    except (OSError, ValueError) as exc:
        raise ClipError("undecodable_image", f"cannot probe: {exc}") from None


def _codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames: np.ndarray, fps: int, path: str | Path | None = None, crf: int | None = None) -> bytes:
    """uint8 (T, H, W, 3) -> H.264 mp4 bytes (mpeg4 where the build lacks libx264); also written to path.
    crf: H.264 constant rate factor (0 lossless .. 51; libx264's default 23 when None)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = _codec()
        options = {"crf": str(crf)} if crf is not None and codec == "libx264" else {}
        stream = container.add_stream(codec, rate=Fraction(fps), options=options)
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
