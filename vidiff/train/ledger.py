"""The sample ledger (train.ledger): which samples each rank consumed at each optimizer step, for audits.

runs/<name>/ledger/rank<r>.jsonl, appended by every rank that reads its own data (the first tensor-parallel rank
of each data-parallel slot, on the first pipeline stage). Each process writes a header line when it starts,
{"segment", "resumed_from", "started", "world", "rank"} (the segment id is the same on every rank of one start;
a reload after non-finite steps starts a new segment), then one
line per step: {"segment", "step", "batches": [{"stream", "epoch", "ids", "skipped_ids"}]}, ids being
"<shard file>/<key>". Lines are flushed to disk at every checkpoint: the steps a crash loses are the ones a
restart replays. tools/ledger_check.py counts each sample of each epoch over the steps that were committed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch.distributed as dist

LEDGER_DIR = "ledger"


def ledger_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LEDGER_DIR / f"rank{rank:05d}.jsonl"


class Ledger:
    """Appends this rank's consumed samples per step (a no-op when `enabled` is false)."""

    def __init__(self, run_dir: Path, rank: int, world: int, enabled: bool):
        self.rank, self.world, self.file, self.segment = rank, world, None, ""
        if enabled:
            path = ledger_file(run_dir, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")

    def start_segment(self, resumed_from: int) -> None:
        """A new segment: this start, or a reload of a checkpoint mid-run (every rank must call)."""
        segment = [f"{os.getpid()}-{resumed_from}-{os.urandom(4).hex()}"]
        if dist.is_initialized():
            dist.broadcast_object_list(segment, src=0)
        self.segment = segment[0]
        if self.file is not None:
            self._write({"segment": self.segment, "resumed_from": resumed_from, "started": time.time(),
                         "world": self.world, "rank": self.rank})

    def _write(self, line: dict) -> None:
        self.file.write(json.dumps(line) + "\n")

    def record(self, step: int, batches: list[dict]) -> None:
        """The micro-batches this rank trained on at `step` (skipped samples were consumed too)."""
        if self.file is None:
            return
        self._write({"segment": self.segment, "step": step, "batches": [
            {"stream": b["stream"], "epoch": b["epoch"], "ids": b["ids"], "skipped_ids": b["skipped_ids"]}
            for b in batches]})

    def flush(self) -> None:
        """To disk (at every checkpoint)."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.flush()
            self.file.close()
