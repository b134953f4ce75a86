"""What people watch: TensorBoard scalars (rank 0 only), a progress bar, throughput."""

from __future__ import annotations

import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class Monitor:
    """Logs scalars to runs/<name>/tb and advances a progress bar; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, total_steps: int):
        self.active = rank == 0
        self.writer = SummaryWriter(str(run_dir / "tb")) if self.active else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=1.0) if self.active else None
        self._last = time.perf_counter()

    def step_seconds(self) -> float:
        """Seconds since the previous call (the wall time of one training step)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.bar.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.4f}", refresh=False)

    def advance(self) -> None:
        if self.active:
            self.bar.update(1)

    def message(self, text: str) -> None:
        if self.active:
            tqdm.write(text)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.writer.close()


def read_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar, read back from every event file under run_dir (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def scalar_tags(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in Path(run_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags.update(acc.Tags()["scalars"])
    return sorted(tags)
