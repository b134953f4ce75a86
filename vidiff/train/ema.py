"""Exponential moving average of the trained weights, kept where the weights live.

Under ZeRO-3 each rank averages only its own shard of every parameter (`p.ds_tensor`); in the pipeline
layout each rank averages its stage's (tensor-parallel slices of) layers; otherwise every rank keeps a
whole copy. The average is exported by swapping it into the parameters' storage and gathering exactly as the
weights are gathered (checkpoint.export_weights), so there is one gathering path for both.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _local(p: nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank stores: its ZeRO-3 shard, or the tensor itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta after every optimizer step (fp32)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for p, average in zip(self.params, self.shadow):
            average.lerp_(_local(p).detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the module's parameters hold the average (to export or evaluate it)."""
        saved = []
        with torch.no_grad():
            for p, average in zip(self.params, self.shadow):
                local = _local(p)
                saved.append(local.clone())
                local.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, backup in zip(self.params, saved):
                    _local(p).copy_(backup)

    @torch.no_grad()
    def set_local(self, parts: list[torch.Tensor]) -> None:
        """Set this rank's part of the average (resume on another layout: train/resume.ema_from_export)."""
        for average, part in zip(self.shadow, parts):
            average.copy_(part)

    def save(self, path: Path) -> None:
        """This rank's part of the average (a checkpoint holds one file per rank)."""
        save_file({str(i): t.contiguous() for i, t in enumerate(self.shadow)}, str(path))

    def load(self, path: Path) -> bool:
        """Restore this rank's part; False (the average restarts from the weights) when the file is missing or
        was written by another layout."""
        if not path.is_file():
            return False
        state = load_file(str(path))
        if len(state) != len(self.shadow) or any(state[str(i)].shape != t.shape for i, t in enumerate(self.shadow)):
            return False
        for i, t in enumerate(self.shadow):
            t.copy_(state[str(i)])
        return True
