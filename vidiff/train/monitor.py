"""What people watch: TensorBoard scalars (rank 0 only), a progress bar, throughput and MFU."""

from __future__ import annotations

import faulthandler
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from vidiff.data.video import encode_gif
from vidiff.device import peak_memory_gb, reset_peak_memory
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
    "perf/data_wait_frac": "Time the step waited for its data (fetch and move to the device) / the step's time, "
                           "mean over ranks and the steps since the last log.",
    "perf/slowest_rank": "The rank that took longest to bring its data to the step (the part of a step no "
                         "collective equalizes), over the steps since the last log.",
    "perf/mfu": "Model FLOPs per second (what runs per token, plus attention: models/dit.training_flops_per_token) "
                "over ranks x peak FLOP/s of one device.",
}


# Noise-level bins of train/loss_by_sigma: log-spaced by 4 around EDM's training draw (median exp(-1.2) = 0.3).
SIGMA_EDGES = (0.05, 0.2, 0.8, 3.2)
PHASES = ("data", "forward_backward", "optimizer")


def sigma_bin_names() -> list[str]:
    edges = ("0", *(f"{e:g}" for e in SIGMA_EDGES), "inf")
    return [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]


class Monitor:
    """Logs scalars to runs/<name>/tb and advances a progress bar (rank 0), and the per-step accounting every rank
    takes part in: phase times, data wait, peak memory, stragglers, loss by noise level, the stall watchdog
    (begin_step, mark, observe_losses, end_step)."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, total_steps: int,
                 device: torch.device | None = None, stall_seconds: float = 0.0, straggler_factor: float = 2.0):
        self.active = rank == 0
        self.device = device or torch.device("cpu")
        self.stall_seconds, self.straggler_factor = stall_seconds, straggler_factor
        self._stalled = False                       # the watchdog has fired once: it is not armed again
        self._phases = dict.fromkeys(PHASES, 0.0)
        self._steps, self._step_seconds = 0, 0.0
        self._bins = torch.zeros(2, len(SIGMA_EDGES) + 1, dtype=torch.float64, device=self.device)  # sums, counts
        self._edges = torch.tensor(SIGMA_EDGES, device=self.device)
        reset_peak_memory(self.device)
        self.writer = SummaryWriter(str(run_dir / "tb")) if self.active else None
        self.bar = progress(total=total_steps, initial=start_step, desc="train", unit="step") if self.active else None
        self._last = time.perf_counter()
        self._described: set[str] = set()

    def step_seconds(self) -> float:
        """Seconds since the previous call (the wall time of one training step)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def begin_step(self) -> None:
        """A step starts (every rank): the data phase's clock, and the watchdog that prints every thread's stack
        (faulthandler) if the step outlasts train.stall_seconds, once per run."""
        if self.stall_seconds > 0 and not self._stalled:
            faulthandler.dump_traceback_later(self.stall_seconds, repeat=False, file=sys.stderr)
        self._begun = self._mark = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the last mark was spent in `phase` (on a GPU after its queued work finishes)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self._phases[phase] += now - self._mark
        self._mark = now

    def observe_losses(self, sigma: torch.Tensor, per_sample: torch.Tensor, usable: torch.Tensor) -> None:
        """Per-sample losses (B,) at noise levels sigma (B,), counted where usable (B,) (no sync: on the device)."""
        index = torch.bucketize(sigma.detach().reshape(-1).to(self._edges.dtype), self._edges)
        usable = usable.reshape(-1).to(torch.float64)
        self._bins[0].index_add_(0, index, per_sample.detach().reshape(-1).to(torch.float64) * usable)
        self._bins[1].index_add_(0, index, usable)

    def end_step(self, step: int, log: bool) -> dict[str, float]:
        """A step ends (every rank). On a log step, a collective: every rank's phase times and peak memory are
        gathered and the loss bins summed; returns the scalars to log (the same on every rank), then starts a new
        interval. A rank whose data took straggler_factor x the median (and at least 5% of the step) is named."""
        if self.stall_seconds > 0 and not self._stalled:
            faulthandler.cancel_dump_traceback_later()
            if time.perf_counter() - self._begun >= self.stall_seconds:
                self._stalled = True
                self.message(f"step {step} took more than train.stall_seconds {self.stall_seconds:g} s: every "
                             "rank printed the stack of its threads (stderr); the watchdog is now off")
        self._steps += 1
        self._step_seconds += time.perf_counter() - self._begun
        if not log:
            return {}
        steps = self._steps
        mine = torch.tensor([self._step_seconds / steps, *(self._phases[p] / steps for p in PHASES),
                             peak_memory_gb(self.device)], dtype=torch.float64, device=self.device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        ranks = [torch.zeros_like(mine) for _ in range(world)]
        if dist.is_initialized():
            dist.all_gather(ranks, mine)
            dist.all_reduce(self._bins)
        else:
            ranks = [mine]
        table = torch.stack(ranks).cpu()           # (world, 1 + phases + 1)
        step_s, data_s = table[:, 0], table[:, 1]
        out = {"perf/data_wait_frac": float((data_s / step_s.clamp(min=1e-12)).clamp(0, 1).mean())}
        out.update({f"perf/step_seconds/{p}": float(table[:, 1 + i].mean()) for i, p in enumerate(PHASES)})
        out.update({f"mem/{r}/peak_gb": float(table[r, -1]) for r in range(world)})
        slowest = int(data_s.argmax())
        median = float(data_s.median())
        out["perf/slowest_rank"] = slowest
        out["perf/slowest_over_median"] = float(data_s[slowest]) / median if median > 0 else 1.0
        if world > 1 and float(data_s[slowest]) > max(self.straggler_factor * median, 0.05 * float(step_s.mean())):
            self.message(f"step {step}: rank {slowest} is a straggler: its data took {float(data_s[slowest]):.3g} s "
                         f"a step, {out['perf/slowest_over_median']:.3g}x the median {median:.3g} s "
                         f"(train.straggler_factor {self.straggler_factor:g})")
        sums, counts = self._bins.cpu()
        for i, name in enumerate(sigma_bin_names()):
            if counts[i] > 0:
                out[f"train/loss_by_sigma/{name}"] = float(sums[i] / counts[i])
                out[f"train/samples_by_sigma/{name}"] = float(counts[i])
        self._phases = dict.fromkeys(PHASES, 0.0)
        self._steps, self._step_seconds = 0, 0.0
        self._bins.zero_()
        reset_peak_memory(self.device)
        return out

    def text(self, tag: str, markdown: str) -> None:
        if self.active:
            self.writer.add_text(tag, markdown, 0)

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
