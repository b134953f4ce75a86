"""What people watch: TensorBoard scalars (rank 0 only), a progress bar, throughput and MFU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from vidiff.data.video import encode_gif
from vidiff.progress import progress

# Dense peak TFLOP/s per GPU by name and precision (vendor data sheets; fp32 means TF32 tensor cores).
GPU_PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.0}, "H200": {"bf16": 989.0, "fp32": 494.0},
                   "A100": {"bf16": 312.0, "fp32": 156.0}}


def measured_peak_tflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """TFLOP/s of this process's best square matmul (the CPU's practical peak with its threads)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best / 1e12


def peak_tflops(precision: str, configured: float | None) -> tuple[float, str]:
    """Peak TFLOP/s of one device for perf/mfu, and where the figure came from."""
    if configured:
        return configured, "parallel.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peaks[precision], f"{name} data sheet"
        return float("nan"), f"{name}: unknown peak, set parallel.peak_tflops"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measured_peak_tflops(dtype), "measured matmul on this CPU"


# What a scalar counts, shown with it in TensorBoard (the tag's description, written with its first value).
DESCRIPTIONS = {
    "train/loss": "Mean per-sample loss over the usable samples of the step's global batch (all micro-batches "
                  "and data-parallel ranks; skipped samples and padding batches excluded).",
    "train/grad_norm": "Global gradient norm before clipping, over all parameters of all ranks.",
    "perf/tokens_per_s": "Latent tokens (after patchify) per second over all ranks, each token counted once.",
    "perf/mfu": "Model FLOPs per second (what runs per token, plus attention: models/dit.training_flops_per_token) "
                "over ranks x peak FLOP/s of one device.",
}


class Monitor:
    """Logs scalars to runs/<name>/tb and advances a progress bar; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, total_steps: int):
        self.active = rank == 0
        self.writer = SummaryWriter(str(run_dir / "tb")) if self.active else None
        self.bar = progress(total=total_steps, initial=start_step, desc="train", unit="step") if self.active else None
        self._last = time.perf_counter()
        self._described: set[str] = set()

    def step_seconds(self) -> float:
        """Seconds since the previous call (the wall time of one training step)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in scalars.items():
            if name in DESCRIPTIONS and name not in self._described:     # the first value carries the description
                self._described.add(name)
                metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"),
                                           summary_description=DESCRIPTIONS[name])
                summary = Summary(value=[Summary.Value(tag=name, simple_value=value, metadata=metadata)])
                self.writer._get_file_writer().add_summary(summary, step)
            else:
                self.writer.add_scalar(name, value, step)
        if "train/loss" in scalars:                 # evaluation logs its own scalars at the same step
            self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)

    def video(self, step: int, tag: str, frames: np.ndarray, fps: int = 8) -> None:
        """An animated GIF preview, uint8 (T, H, W, 3), as a TensorBoard image (its add_video needs moviepy 1)."""
        if not self.active:
            return
        T, H, W, _ = frames.shape
        image = Summary.Image(height=H, width=W, colorspace=3, encoded_image_string=encode_gif(frames, fps))
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def advance(self) -> None:
        if self.active:
            self.bar.update(1)

    def start_at(self, step: int) -> None:
        """The progress bar continues from `step` (a resumed or reloaded run)."""
        if self.active:
            self.bar.n = step
            self.bar.refresh()

    def message(self, text: str) -> None:
        if self.active:
            tqdm.write(text)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.writer.close()


def _event_files(run_dir: Path):
    """An EventAccumulator per TensorBoard event file under run_dir, oldest file first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        yield acc


def read_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar, read back from every event file under run_dir (later files win)."""
    return {e.step: e.value for acc in _event_files(run_dir) if tag in acc.Tags()["scalars"]
            for e in acc.Scalars(tag)}


def read_images(run_dir: Path, tag: str) -> dict[int, bytes]:
    """{step: encoded image bytes} of one image summary (e.g. a GIF preview), read back from event files."""
    return {e.step: e.encoded_image_string for acc in _event_files(run_dir) if tag in acc.Tags()["images"]
            for e in acc.Images(tag)}


def scalar_description(run_dir: Path, tag: str) -> str:
    """The description a scalar was written with (DESCRIPTIONS), read back from the event files."""
    return next((acc.SummaryMetadata(tag).summary_description for acc in _event_files(run_dir)
                 if tag in acc.Tags()["scalars"]), "")


def scalar_tags(run_dir: Path) -> list[str]:
    return sorted({tag for acc in _event_files(run_dir) for tag in acc.Tags()["scalars"]})
